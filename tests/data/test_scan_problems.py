"""One dataset scan finds every problem of every kind and reports them together, grouped and counted, before any
model loads; dataset.skip_bad_images also skips images whose caption cannot be read; images far smaller than the
size they train at are listed with their upscale factor (library/data/folders.py, errors.py, buckets.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

import train_lora
from library.data.buckets import BucketSettings, assign_buckets, square_assignment, upscale_warning
from library.data.errors import GROUP_LIMIT, DatasetError
from library.data.folders import ImageItem, collect_scan, find_subsets, subsets_from_folder
from tests.helpers import SAMPLES


def image(path: Path, size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path)
    return path


def config(tmp: Path, train: Path, extra: str = "") -> Path:
    path = tmp / "run.toml"
    path.write_text(f"""[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train.as_posix()}"
resolution = 64
{extra}
[network]
rank = 2
[train]
max_steps = 1
seed = 1
[save]
output_dir = "{(tmp / 'out').as_posix()}"
name = "scan"
[logging]
log_dir = "{(tmp / 'logs').as_posix()}"
""", encoding="utf-8")
    return path


def run(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.fixture
def messy(tmp_path) -> Path:
    """A train_dir with one problem of every kind: two misnamed folders (one holding a corrupt image), a caption
    that is not UTF-8, one that claims UTF-16 but is not, a corrupt image, and an empty folder."""
    train = tmp_path / "train"
    image(train / "5_x" / "a.png")
    image(train / "5_x" / "b.png")
    (train / "5_x" / "b.txt").write_bytes(b"caf\xff")
    image(train / "5_x" / "u.png")
    (train / "5_x" / "u.txt").write_bytes(b"\xff\xfeA")  # a UTF-16 mark, then half a character
    (train / "5_x" / "c.png").write_bytes(b"not an image")
    (train / "abc").mkdir()
    (train / "abc" / "d.png").write_bytes(b"")
    (train / "0_y").mkdir()
    (train / "3_empty").mkdir()
    return train


def test_one_run_reports_every_problem_grouped_and_counted_before_the_model_loads(tmp_path, messy, capsys,
                                                                                    monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the dataset problems were reported")

    monkeypatch.setattr("library.models.loading.load_model", no_model)
    assert run(train_lora.main, [str(config(tmp_path, messy))]) == 2  # a real run, not --check
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert f"error: dataset: 6 problems in {messy}" in err
    assert "folder names (2): name each folder NN_name" in err
    assert f'{messy / "abc"} has no repeat count: rename it to "{messy / "10_abc"}"' in err
    assert f'{messy / "0_y"} has 0 repeats' in err and f'"{messy / "1_y"}"' in err
    assert "captions that cannot be read (2): fix them, or set dataset.skip_bad_images = true" in err
    assert f"{messy / '5_x' / 'b.txt'}: not valid UTF-8 (byte 0xff at position 3); re-save it as UTF-8" in err
    assert f"{messy / '5_x' / 'u.txt'}: starts with a UTF-16 byte-order mark but is not valid UTF-16" in err
    assert "images that cannot be read (2): fix or remove them, or set dataset.skip_bad_images = true" in err
    assert f"{messy / '5_x' / 'c.png'}: cannot identify image file" in err
    assert f"{messy / 'abc' / 'd.png'}: empty file" in err  # inside a misnamed folder: found in the same run
    assert f"{messy / '3_empty'}: no images in this folder" in err.split("also noticed (not errors):")[1]


def test_check_lists_the_same_problems_and_exits_2(tmp_path, messy, capsys):
    assert run(train_lora.main, [str(config(tmp_path, messy)), "--check"]) == 2
    err = capsys.readouterr().err
    assert "dataset: 6 problems" in err and "Traceback" not in err


def test_each_group_lists_at_most_its_limit_and_counts_the_rest(tmp_path):
    train = tmp_path / "train"
    image(train / "1_cat" / "good.png")
    for i in range(GROUP_LIMIT + 5):
        (train / "1_cat" / f"bad{i:02d}.png").write_bytes(b"x")
        (train / f"cat{i:02d}").mkdir()
    scan = collect_scan(find_subsets(train).subsets)
    text = str(DatasetError(scan.unreadable(), [train]))
    assert f"images that cannot be read ({GROUP_LIMIT + 5})" in text
    assert text.count("    - ") == GROUP_LIMIT and "    ... and 5 more" in text
    with pytest.raises(DatasetError) as info:
        subsets_from_folder(train)
    assert len(info.value.problems) == GROUP_LIMIT + 5 and "folder names (25)" in str(info.value)


def test_a_single_problem_stays_one_line(tmp_path):
    with pytest.raises(DatasetError) as info:
        subsets_from_folder(tmp_path / "nowhere")
    assert str(info.value) == f"train_dir {tmp_path / 'nowhere'} does not exist; check the path in your config"


def test_skip_bad_images_also_skips_images_whose_caption_cannot_be_read(tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(SAMPLES, train)
    folder = train / "10_kiln pot"
    latin = sorted(folder.glob("*.txt"))[0]
    latin.write_bytes("caf\xe9, kiln pot".encode("latin-1"))
    path = config(tmp_path, train)
    assert run(train_lora.main, [str(path), "--check"]) == 2
    assert f"{latin}: not valid UTF-8" in capsys.readouterr().err
    assert run(train_lora.main, [str(path), "dataset.skip_bad_images=true"]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable image left out" in out
    assert "1 image left out because its caption cannot be read:" in out and f"{latin}: not valid UTF-8" in out
    with safe_open(str(tmp_path / "out" / "scan.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "50"  # 5 of the 6 images x 10 repeats


def test_skip_with_nothing_left_lists_what_was_left_out(tmp_path, capsys):
    train = tmp_path / "train"
    image(train / "2_cat" / "a.png")
    (train / "2_cat" / "a.txt").write_bytes(b"\xe9")
    assert run(train_lora.main, [str(config(tmp_path, train)), "--check", "dataset.skip_bad_images=true"]) == 2
    err = capsys.readouterr().err
    assert "images left out by dataset.skip_bad_images = true (1): no training image is left" in err
    assert str(train / "2_cat" / "a.txt") in err


def test_tiny_images_are_a_warning_with_size_and_upscale_factor(tmp_path, capsys):
    train = tmp_path / "train"
    image(train / "3_cat" / "big.png", (128, 128))
    image(train / "3_cat" / "edge.png", (64, 64))  # exactly half of 128: upscaled 2x, not listed
    image(train / "3_cat" / "quarter.png", (32, 32))
    image(train / "3_cat" / "dot.png", (1, 1))
    image(train / "3_cat" / "strip.png", (200, 60))
    path = config(tmp_path, train)
    assert run(train_lora.main, [str(path), "--check", "dataset.resolution=128"]) == 0  # a warning, not an error
    warning = capsys.readouterr().out.split("  warning: ")[1].split("plan:")[0]
    assert warning.startswith("3 images are upscaled more than 2x to their training size")
    assert f"{train / '3_cat' / 'dot.png'} 1x1 -> 128x128 (128x)" in warning
    assert f"{train / '3_cat' / 'quarter.png'} 32x32 -> 128x128 (4x)" in warning
    assert f"{train / '3_cat' / 'strip.png'} 200x60 -> 128x128 (2.13x)" in warning
    assert "edge.png" not in warning and "big.png" not in warning
    assert run(train_lora.main, [str(path), "--check", "dataset.resolution=128", "dataset.enable_buckets=true"]) == 0
    warning = capsys.readouterr().out.split("  warning: ")[1].split("plan:")[0]
    assert warning.startswith("2 images are upscaled") and "dot.png" in warning and "quarter.png" in warning
    assert "strip.png" not in warning  # it trains at the 192x64 bucket: barely upscaled


def test_upscale_factor_is_measured_against_the_bucket_each_image_gets(tmp_path):
    items = [ImageItem(image(tmp_path / name, size), "", False, 1, False, 0)
             for name, size in (("wide.png", (256, 60)), ("small.png", (100, 100)), ("big.png", (600, 600)))]
    square = square_assignment(items, 512)
    assert [line.split()[-1] for line in upscale_warning(items, square)[1:]] == ["(8.53x)", "(5.12x)"]
    buckets = assign_buckets(items, BucketSettings(512, 256, 1024, 64))
    lines = upscale_warning(items, buckets)
    assert "small.png 100x100 -> 512x512 (5.12x)" in "\n".join(lines) and "wide.png" in "\n".join(lines)
    assert upscale_warning(items[2:], square_assignment(items[2:], 512)) == []
