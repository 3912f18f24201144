"""Dataset folders, captions, image decoding and caption processing (library/dataset.py, library/images.py)."""
from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.captions import CaptionOptions, process_caption
from library.data.errors import DatasetError
from library.data.folders import (ImageItem, Subset, balance_reg_items, expand_samples, parse_folder_name, reg_balance_message, scan_subsets, subsets_from_folder)
from library.data.images import image_problem, load_alpha, load_image, resize_and_crop, to_tensor

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "sample_dataset"


def make_image(path: Path, size=(16, 12), colour=(200, 50, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def scan_folder(root: Path, **kwargs):
    return scan_subsets(subsets_from_folder(root, **kwargs))


# --- folder names -----------------------------------------------------------------------------------------

def test_parse_folder_name():
    assert parse_folder_name("25_my concept") == (25, "my concept")
    assert parse_folder_name("10_cat_dog") == (10, "cat_dog")
    assert parse_folder_name("5_") == (5, "")
    assert parse_folder_name("cat") is None
    assert parse_folder_name("0_cat") is None
    assert parse_folder_name("cat_10") is None


def test_subsets_from_folder_reads_repeats_and_class_tokens(tmp_path):
    make_image(tmp_path / "25_my concept" / "a.png")
    make_image(tmp_path / "3_dog" / "b.png")
    (tmp_path / ".cache").mkdir()  # hidden folders are not subsets and not errors
    subsets = subsets_from_folder(tmp_path, is_reg=True, caption_extension=".caption")
    assert [(s.image_dir.name, s.repeats, s.class_tokens) for s in subsets] == [
        ("25_my concept", 25, "my concept"),
        ("3_dog", 3, "dog"),
    ]
    assert all(s.is_reg and s.caption_extension == ".caption" for s in subsets)


def test_bad_folder_names_are_all_reported_with_the_fix(tmp_path):
    make_image(tmp_path / "10_good" / "a.png")
    for name in ("cat", "dog_5", "0_bird"):
        (tmp_path / name).mkdir()
    with pytest.raises(DatasetError) as info:
        subsets_from_folder(tmp_path)
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert f'rename it to "{tmp_path / "10_cat"}"' in text
    assert f'"{tmp_path / "5_dog"}"' in text
    assert f'"{tmp_path / "1_bird"}"' in text
    assert str(tmp_path / "cat") in text


def test_images_directly_in_root_explain_the_layout(tmp_path):
    make_image(tmp_path / "photo.jpg")
    with pytest.raises(DatasetError, match=r"directly in train_dir.*photo\.jpg.*NN_name"):
        subsets_from_folder(tmp_path)


def test_missing_root_and_root_without_subfolders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        subsets_from_folder(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no NN_name subfolders"):
        subsets_from_folder(tmp_path)


# --- scanning and captions --------------------------------------------------------------------------------

def test_missing_caption_falls_back_to_class_tokens_and_is_listed(tmp_path):
    folder = tmp_path / "4_red box"
    make_image(folder / "a.png")
    make_image(folder / "b.jpg")
    (folder / "a.txt").write_text("red box, on a table\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a caption", encoding="utf-8")
    scan = scan_folder(tmp_path)
    by_name = {item.path.name: item for item in scan.items}
    assert by_name["a.png"].caption == "red box, on a table" and by_name["a.png"].caption_from_file
    assert by_name["b.jpg"].caption == "red box" and not by_name["b.jpg"].caption_from_file
    assert scan.missing_captions == [folder / "b.jpg"]
    assert scan.num_train_samples() == 8
    summary = "\n".join(scan.summary_lines())
    assert "captions 1 found / 1 missing; 2 images x 4 repeats = 8 samples" in summary
    assert str(folder / "b.jpg") in summary


def test_empty_caption_file_counts_as_missing(tmp_path):
    folder = tmp_path / "1_cat"
    make_image(folder / "a.png")
    (folder / "a.txt").write_text("  \n", encoding="utf-8")
    scan = scan_folder(tmp_path)
    assert scan.items[0].caption == "cat" and scan.missing_captions == [folder / "a.png"]


def test_caption_with_bom_crlf_and_utf16(tmp_path):
    folder = tmp_path / "1_cat"
    make_image(folder / "a.png")
    make_image(folder / "b.png")
    (folder / "a.txt").write_bytes("\ufeffcafé, chat\r\n".encode("utf-8"))
    (folder / "b.txt").write_bytes("chien, 犬".encode("utf-16"))  # Notepad "Unicode" (UTF-16 with BOM)
    captions = [item.caption for item in scan_folder(tmp_path).items]
    assert captions == ["café, chat", "chien, 犬"]


def test_multiline_caption_lines_are_joined(tmp_path):
    folder = tmp_path / "1_cat"
    make_image(folder / "a.png")
    (folder / "a.txt").write_text("cat, sitting\n\non a mat\n", encoding="utf-8")
    assert scan_folder(tmp_path).items[0].caption == "cat, sitting, on a mat"


def test_non_utf8_captions_name_every_file(tmp_path):
    folder = tmp_path / "1_cat"
    for name in ("a", "b"):
        make_image(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError) as info:
        scan_folder(tmp_path)
    assert len(info.value.problems) == 2
    text = str(info.value)
    assert str(folder / "a.txt") in text and str(folder / "b.txt") in text
    assert "not valid UTF-8" in text and "re-save it as UTF-8" in text


def test_empty_dataset_names_folders_and_what_was_found(tmp_path):
    folder = tmp_path / "10_cat"
    folder.mkdir()
    (folder / "a.caption").write_text("cat", encoding="utf-8")
    (folder / "b.gif").write_bytes(b"GIF89a")
    (folder / "raw").mkdir()
    with pytest.raises(DatasetError) as info:
        scan_folder(tmp_path)
    text = str(info.value)
    assert "no training images found" in text and str(folder) in text
    assert "1 '.caption' files" in text and "1 '.gif' files" in text and "raw" in text
    assert ".png" in text  # names the supported types


def test_caption_extension_trap_is_pointed_out(tmp_path):
    folder = tmp_path / "2_cat"
    for name in ("a", "b"):
        make_image(folder / f"{name}.png")
        (folder / f"{name}.caption").write_text("cat, grey", encoding="utf-8")
    scan = scan_folder(tmp_path, caption_extension=".txt")
    assert len(scan.missing_captions) == 2
    summary = "\n".join(scan.summary_lines())
    assert "2 images without a '.txt' caption have a '.caption' file" in summary
    assert 'caption_extension = ".caption"' in summary
    fixed = scan_folder(tmp_path, caption_extension="caption")  # the dot is optional
    assert [item.caption for item in fixed.items] == ["cat, grey", "cat, grey"]
    assert not fixed.notes


def test_scan_is_sorted_case_insensitive_and_not_recursive(tmp_path):
    folder = tmp_path / "1_cat"
    for name in ("b.PNG", "a.JpEg", "c.webp"):
        make_image(folder / name)
    make_image(folder / "nested" / "d.png")
    (folder / "b.TXT").write_text("upper", encoding="utf-8")
    scan = scan_folder(tmp_path)
    assert [item.path.name for item in scan.items] == ["a.JpEg", "b.PNG", "c.webp"]
    assert scan.items[1].caption == "upper"
    assert any("subfolders are not searched (nested)" in note for note in scan.notes)


def test_truncated_and_garbage_images_are_listed_not_raised(tmp_path):
    folder = tmp_path / "1_cat"
    good = make_image(folder / "good.png")
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = folder / "full.jpg"
    Image.fromarray(noisy).save(full, quality=95)
    data = full.read_bytes()
    full.unlink()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    png = io.BytesIO()
    Image.fromarray(noisy).save(png, format="PNG")
    (folder / "cut.png").write_bytes(png.getvalue()[:-200])
    (folder / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (folder / "empty.bmp").write_bytes(b"")
    scan = scan_folder(tmp_path)
    assert [item.path for item in scan.items] == [good]
    reasons = dict(scan.bad_images)
    assert "truncated" in reasons[folder / "cut.jpg"]
    assert reasons[folder / "cut.png"]  # truncated PNG data stream
    assert "cannot identify image file" in reasons[folder / "garbage.png"]
    assert "empty file" in reasons[folder / "empty.bmp"]
    summary = "\n".join(scan.summary_lines())
    assert "4 images cannot be read" in summary and "garbage.png" in summary
    with pytest.raises(OSError):
        load_image(folder / "cut.jpg")
    assert len(scan_subsets(scan.subsets, check_images=False).items) == 5


def test_long_lists_are_shortened_in_the_summary(tmp_path):
    folder = tmp_path / "1_cat"
    for i in range(13):
        make_image(folder / f"{i:02d}.png", size=(4, 4))
    lines = scan_folder(tmp_path).summary_lines()
    assert "  ... and 3 more" in lines


def test_reg_folders_and_balancing(tmp_path):
    make_image(tmp_path / "train" / "5_cat" / "a.png")
    make_image(tmp_path / "train" / "5_cat" / "b.png")
    for name in ("x", "y", "z"):
        make_image(tmp_path / "reg" / "1_animal" / f"{name}.png")
    (tmp_path / "train" / "2_forgotten").mkdir()
    subsets = subsets_from_folder(tmp_path / "train") + subsets_from_folder(tmp_path / "reg", is_reg=True)
    scan = scan_subsets(subsets)
    assert scan.num_train_samples() == 10 and len(scan.reg_items) == 3
    assert any("2_forgotten: no images in this folder" in note for note in scan.notes)
    balanced = balance_reg_items(scan.num_train_samples(), scan.reg_items)
    assert [item.repeats for item in balanced] == [4, 3, 3]  # kohya: cycle one image at a time
    assert [item.path for item in balanced] == [item.path for item in scan.reg_items]
    assert "raised" in reg_balance_message(10, scan.reg_items)
    assert any(line.startswith("total reg:   3 images, 3 samples") for line in scan.summary_lines())


def test_balance_keeps_surplus_reg_samples():
    items = [ImageItem(Path(f"{i}.png"), "dog", False, 2, True, 0) for i in range(4)]
    assert [item.repeats for item in balance_reg_items(5, items)] == [2, 2, 2, 2]
    assert "all are kept" in reg_balance_message(5, items)
    assert [item.repeats for item in balance_reg_items(11, items)] == [3, 3, 3, 2]
    assert balance_reg_items(10, []) == []


def test_expand_samples_repeats_items_in_order():
    items = [ImageItem(Path("a"), "", False, 2, False, 0), ImageItem(Path("b"), "", False, 3, False, 1)]
    assert expand_samples(items) == [0, 0, 1, 1, 1]


def test_missing_subset_folder_and_bad_repeats(tmp_path):
    with pytest.raises(DatasetError) as info:
        scan_subsets([Subset(tmp_path / "gone", 1, "x"), Subset(tmp_path, 0, "y")])
    text = str(info.value)
    assert "gone does not exist" in text and "repeats must be at least 1" in text


# --- image decoding ---------------------------------------------------------------------------------------

def test_exif_rotated_image_comes_back_upright(tmp_path):
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    stored.save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (32, 64)
    top, bottom = img.getpixel((16, 8)), img.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60  # stored left (red) is on top once upright
    assert bottom[2] > 200 and bottom[0] < 60


def test_mode_conversions_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    img = load_image(tmp_path / "rgba.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (255, 0, 0)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((2, 2)) == (10, 200, 30)

    la = Image.new("LA", (4, 4), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)

    grey16 = np.full((4, 4), 32768, dtype=np.uint16)
    grey16[0, 0], grey16[0, 1] = 65535, 1028
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    assert img.getpixel((2, 2)) == (128, 128, 128)  # scaled, not clipped to white
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (4, 4, 4)

    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((8, 8))
    assert r < 20 and g > 235 and b > 235  # pure cyan ink


def test_load_alpha(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.save(tmp_path / "a.png")
    alpha = load_alpha(tmp_path / "a.png")
    assert alpha.mode == "L" and alpha.getpixel((0, 0)) == 0 and alpha.getpixel((3, 1)) == 255
    assert load_alpha(make_image(tmp_path / "b.png")) is None


def test_image_problem_accepts_good_images(tmp_path):
    assert image_problem(make_image(tmp_path / "a.webp")) is None
    assert image_problem(make_image(tmp_path / "a.bmp")) is None


def test_resize_and_crop_covers_then_crops(tmp_path):
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # red left quarter is cropped away by a centre crop
    out = resize_and_crop(img, 64, 64)
    assert out.size == (64, 64)
    assert out.getpixel((0, 32))[2] > 200 and out.getpixel((0, 32))[0] < 60
    left_crops = {resize_and_crop(img, 64, 64, True, random.Random(s)).getpixel((0, 32))[0] > 200 for s in range(20)}
    assert left_crops == {True, False}  # random crops sometimes include the red edge
    a = resize_and_crop(img, 48, 32, True, random.Random(3))
    b = resize_and_crop(img, 48, 32, True, random.Random(3))
    assert a.tobytes() == b.tobytes() and a.size == (48, 32)
    assert resize_and_crop(Image.new("RGB", (10, 30)), 64, 96).size == (64, 96)  # upscales too


def test_to_tensor_range_and_layout():
    img = Image.new("RGB", (3, 2), (0, 255, 0))
    t = to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t[1], torch.ones(2, 3)) and torch.allclose(t[0], -torch.ones(2, 3))


# --- caption processing -----------------------------------------------------------------------------------

def test_process_caption_plain_normalises_and_applies_prefix_suffix():
    rng = random.Random(0)
    opts = CaptionOptions(prefix="sks", suffix="best quality")
    assert process_caption("cat, ,  grey ,", opts, rng) == "sks, cat, grey, best quality"
    assert process_caption("", opts, rng) == "sks, best quality"
    assert process_caption("a|b", CaptionOptions(separator="|"), rng) == "a, b"


def test_keep_tokens_stay_first_when_shuffling():
    caption = "t0, t1, t2, t3, t4, t5, t6"
    opts = CaptionOptions(shuffle=True, keep_tokens=2)
    orders = set()
    for seed in range(20):
        tags = process_caption(caption, opts, random.Random(seed)).split(", ")
        assert tags[:2] == ["t0", "t1"] and sorted(tags) == caption.split(", ")
        orders.add(tuple(tags))
    assert len(orders) > 5  # the rest really is shuffled
    assert process_caption(caption, opts, random.Random(7)) == process_caption(caption, opts, random.Random(7))


def test_prefix_counts_in_keep_tokens():
    opts = CaptionOptions(prefix="sks, photo", shuffle=True, keep_tokens=2)
    for seed in range(10):
        assert process_caption("a, b, c, d", opts, random.Random(seed)).startswith("sks, photo, ")


def test_caption_dropout_and_tag_dropout():
    assert process_caption("a, b", CaptionOptions(prefix="sks", dropout_rate=1.0), random.Random(0)) == ""
    opts = CaptionOptions(keep_tokens=1, tag_dropout_rate=1.0)
    assert process_caption("keep, b, c", opts, random.Random(0)) == "keep"
    half = CaptionOptions(keep_tokens=1, tag_dropout_rate=0.5)
    tags = [f"t{i}" for i in range(40)]
    kept = process_caption(", ".join(tags), half, random.Random(1)).split(", ")
    assert kept[0] == "t0" and 5 < len(kept) < 35 and kept == [t for t in tags if t in kept]


# --- bundled sample dataset -------------------------------------------------------------------------------

def test_shipped_sample_dataset_scans_cleanly():
    subsets = subsets_from_folder(SAMPLE / "train") + subsets_from_folder(SAMPLE / "reg", is_reg=True)
    scan = scan_subsets(subsets)
    assert not scan.bad_images and not scan.missing_captions and not scan.notes
    assert len(scan.train_items) == 6 and len(scan.reg_items) == 4
    assert all(item.caption.startswith("kiln pot, ") for item in scan.train_items)
    assert {load_image(item.path).size for item in scan.items} == {(128, 128), (128, 96), (96, 128)}
    assert {item.path.suffix for item in scan.items} == {".png", ".jpg"}
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < 100_000


def test_sample_dataset_generator_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import make_sample_dataset

    written = make_sample_dataset.make_sample_dataset(tmp_path)
    assert len(written) == 10
    for path in written:
        shipped = SAMPLE / path.relative_to(tmp_path)
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == shipped.with_suffix(".txt").read_text(
            encoding="utf-8")
        new, old = np.asarray(load_image(path), dtype=np.int16), np.asarray(load_image(shipped), dtype=np.int16)
        # PNGs are exact; JPEG encoders of other Pillow builds may differ by a few levels.
        assert np.abs(new - old).max() <= (0 if path.suffix == ".png" else 8)
    sys.modules.pop("make_sample_dataset", None)
