"""Batch tag edits, frequency tables and safe caption rewrites (tag_images.py edit / freq)."""
import os
from pathlib import Path

import pytest
from PIL import Image

import tag_images
from library.data.folders import scan_subsets, subsets_from_folder
from library.atomic import write_text_atomically
from library.prep.tag_edit import (
    BACKUP_FOLDER,
    Backup,
    TagEditError,
    TagEdits,
    apply_edits,
    find_captions,
    frequency_lines,
    read_tag_list,
    tag_frequency,
)


def make_dataset(root: Path, captions: dict[str, str], folder: str = "10_kiln pot") -> Path:
    """train_dir/<folder>/<stem>.png with the given caption texts (None: no caption file)."""
    sub = root / folder
    sub.mkdir(parents=True, exist_ok=True)
    for stem, text in captions.items():
        Image.new("RGB", (8, 8), (120, 80, 40)).save(sub / f"{stem}.png")
        if text is not None:
            (sub / f"{stem}.txt").write_text(text, encoding="utf-8")
    return sub


def test_plain_edits_match_whole_tags_in_the_documented_order():
    tags = ["1girl", "blurry", "motion blur", "red hair", "pot", "pot", "signature"]
    edits = TagEdits(remove=("signature", "blurry"), replace=(("red hair", "red_hair, long hair"), ("1girl", "")),
                     dedupe=True, front=("kiln pot", "pot"))
    assert apply_edits(tags, edits) == ["kiln pot", "pot", "motion blur", "red_hair", "long hair"]
    # replace works on whole tags only; "blur" is not a tag here
    assert apply_edits(["motion blur"], TagEdits(replace=(("blur", "x"),))) == ["motion blur"]


def test_regex_edits_remove_whole_tags_and_substitute_inside_tags():
    tags = ["blurry", "motion blur", "long_hair", "artist:bob"]
    edits = TagEdits(remove=(r"blur\w*", r"artist:.*"), replace=((r"(\w+)_(\w+)", r"\1 \2"),), regex=True)
    assert apply_edits(tags, edits) == ["motion blur", "long hair"]


def test_keep_only_keeps_the_front_trigger_and_ignores_underscore_and_case_differences():
    edits = TagEdits(keep_only=("Red_Hair", "smile"), front=("kiln pot",))
    assert apply_edits(["smile", "red hair", "watermark", "kiln pot"], edits) == ["kiln pot", "smile", "red hair"]


def test_invalid_regex_is_refused_with_the_pattern():
    with pytest.raises(TagEditError, match=r"'\(unclosed'"):
        TagEdits(remove=("(unclosed",), regex=True)


def test_dry_run_prints_a_diff_and_changes_nothing(tmp_path, capsys):
    sub = make_dataset(tmp_path, {"a": "pot, watermark, kiln", "b": "kiln, pot"})
    before = {p.name: p.read_bytes() for p in sub.iterdir()}
    assert tag_images.main(["edit", str(tmp_path), "--remove", "watermark", "--front", "kiln", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-watermark" in out and "+kiln" in out and "a.txt" in out
    assert "b.txt" not in out  # already has kiln first and no watermark
    assert "1 of 2 caption files would change" in out
    assert {p.name: p.read_bytes() for p in sub.iterdir()} == before
    assert not (tmp_path / BACKUP_FOLDER).exists()


def test_edit_rewrites_changed_files_and_keeps_every_backup(tmp_path, capsys):
    sub = make_dataset(tmp_path, {"a": "pot, watermark", "b": "kiln", "c": None})
    os.utime(sub / "b.txt", (1_000_000, 1_000_000))
    assert tag_images.main(["edit", str(tmp_path), "--remove", "watermark"]) == 0
    out = capsys.readouterr().out
    assert "changed 1 of 2" in out and "1 images have no caption file" in out
    assert (sub / "a.txt").read_text(encoding="utf-8") == "pot\n"
    assert (sub / "b.txt").stat().st_mtime == 1_000_000  # untouched files are not rewritten
    assert not (sub / "c.txt").exists()
    first = sorted((tmp_path / BACKUP_FOLDER).iterdir())
    assert len(first) == 1
    assert (first[0] / "10_kiln pot" / "a.txt").read_text(encoding="utf-8") == "pot, watermark"
    assert not (first[0] / "10_kiln pot" / "b.txt").exists()

    assert tag_images.main(["edit", str(tmp_path), "--replace", "pot", "vase"]) == 0
    backups = sorted((tmp_path / BACKUP_FOLDER).iterdir())
    assert len(backups) == 2  # a second run in the same second gets its own folder
    assert (first[0] / "10_kiln pot" / "a.txt").read_text(encoding="utf-8") == "pot, watermark"
    newer = next(b for b in backups if b != first[0])
    assert (newer / "10_kiln pot" / "a.txt").read_text(encoding="utf-8") == "pot\n"
    assert (sub / "a.txt").read_text(encoding="utf-8") == "vase\n"
    # the dataset scan ignores the hidden backup folder and sees the edited captions
    scan = scan_subsets(subsets_from_folder(tmp_path))
    assert {item.path.stem: item.caption for item in scan.items}["a"] == "vase"


def test_edit_with_nothing_to_do_is_an_error(tmp_path, capsys):
    make_dataset(tmp_path, {"a": "pot"})
    assert tag_images.main(["edit", str(tmp_path)]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_keep_only_file_from_the_command_line(tmp_path):
    sub = make_dataset(tmp_path, {"a": "pot, smile, watermark, kiln"})
    keep = tmp_path / "keep.txt"
    keep.write_text("# tags worth keeping\npot\nsmile, blue sky\n", encoding="utf-8")
    assert read_tag_list(keep) == ["pot", "smile", "blue sky"]
    assert tag_images.main(["edit", str(sub), "--keep-only", str(keep), "--front", "kiln"]) == 0
    assert (sub / "a.txt").read_text(encoding="utf-8") == "kiln, pot, smile\n"


def test_frequency_counts_files_not_repeats(tmp_path, capsys):
    make_dataset(tmp_path, {"a": "pot, pot, kiln", "b": "pot\nsmile", "c": "pot"})
    files, _ = find_captions(tmp_path)
    counts = tag_frequency(files)
    assert counts == {"pot": 3, "kiln": 1, "smile": 1}
    lines = frequency_lines(counts, len(files), top=2)
    assert lines[0] == "3 distinct tags in 3 caption files"
    assert lines[1].split() == ["3", "100.0%", "pot"] and lines[2].endswith("kiln")
    assert "1 more" in lines[3]
    assert tag_images.main(["freq", str(tmp_path), "--top", "0"]) == 0
    assert "smile" in capsys.readouterr().out


def test_wrong_caption_extension_is_named(tmp_path, capsys):
    sub = make_dataset(tmp_path, {"a": None})
    (sub / "a.caption").write_text("pot", encoding="utf-8")
    assert tag_images.main(["freq", str(tmp_path)]) == 2
    assert "--caption-ext .caption" in capsys.readouterr().err
    assert tag_images.main(["freq", str(tmp_path), "--caption-ext", "caption"]) == 0


def test_caption_lookup_ignores_case_and_no_recursive_stays_on_top(tmp_path):
    sub = make_dataset(tmp_path, {"a": None})
    (sub / "A.TXT").write_text("pot", encoding="utf-8")
    files, missing = find_captions(tmp_path)
    assert files == [sub / "A.TXT"] and missing == []
    with pytest.raises(TagEditError, match="no images in"):
        find_captions(tmp_path, recursive=False)


def test_unreadable_caption_is_named(tmp_path):
    sub = make_dataset(tmp_path, {"a": None})
    (sub / "a.txt").write_bytes(b"caf\xe9, pot")  # Latin-1, not UTF-8
    with pytest.raises(TagEditError, match="a.txt"):
        tag_frequency(find_captions(tmp_path)[0])


def test_atomic_write_keeps_permissions_and_backup_never_reuses_a_folder(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old", encoding="utf-8")
    path.chmod(0o640)
    write_text_atomically(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n" and (path.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind
    folders = []
    for _ in range(3):
        backup = Backup(tmp_path)
        backup.save(path)
        folders.append(backup.folder)
    assert len(set(folders)) == 3
