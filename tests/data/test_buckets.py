"""Aspect-ratio buckets: the bucket set, assignment, batching by bucket, the printed table, and a real training
run with portrait, landscape and square images."""
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_lora
from library.data.buckets import (BucketSettings, assign_buckets, auto_bucket_range, bucket_resolutions, closest_bucket,
                             no_upscale_bucket, upright_size)
from library.config.loading import ConfigError
from library.data.captions import CaptionOptions
from library.data.folders import ImageItem
from library.data.sources import LatentSource
from library.data.batches import TrainingData
from library.recipes.lora import RECIPE as LORA
from library.recipes.run import read_config

SETTINGS = [(512, 64), (512, 32), (768, 64), (1024, 64), (96, 32), (640, 64)]


@pytest.mark.parametrize("resolution,step", SETTINGS)
def test_bucket_set_respects_area_steps_range_and_both_orientations(resolution, step):
    low, high = auto_bucket_range(resolution, step)
    buckets = bucket_resolutions(resolution, low, high, step)
    square = resolution // step * step
    assert (square, square) in buckets
    for w, h in buckets:
        assert w * h <= resolution * resolution
        assert w % step == 0 and h % step == 0
        assert (h, w) in buckets
        assert (low <= w <= high and low <= h <= high) or w == h == square


def test_bucket_set_matches_sd_scripts_at_512():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert auto_bucket_range(512, 64) == (256, 1024)
    landscape = sorted(b for b in buckets if b[0] > b[1])
    assert landscape == [(576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                         (1024, 256)]


def test_closest_aspect_ratio_and_orientation():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert closest_bucket(1500, 1000, buckets) == (640, 384)  # 3:2 → 1.67 beats 1.29
    assert closest_bucket(1000, 1500, buckets) == (384, 640)
    assert closest_bucket(333, 333, buckets) == (512, 512)
    assert closest_bucket(4000, 100, buckets) == (1024, 256)  # beyond the widest bucket: the widest
    for w, h in [(800, 600), (600, 800), (1920, 1080), (1080, 1920), (1000, 999)]:
        bw, bh = closest_bucket(w, h, buckets)
        assert (bw >= bh) == (w >= h) or abs(w / h - 1) < 0.01  # orientation kept
        assert closest_bucket(h, w, buckets) == (bh, bw)  # mirror image, mirror bucket
        error = abs(math.log(bw / bh) - math.log(w / h))
        assert all(error <= abs(math.log(x / y) - math.log(w / h)) + 1e-12 for x, y in buckets)


def test_no_upscale_keeps_small_images_small_and_big_ones_within_the_area():
    assert no_upscale_bucket(300, 200, 512, 1024, 64) == (256, 192)
    for w, h in [(300, 200), (4000, 3000), (513, 511), (8000, 10), (10, 8000), (700, 700), (64, 64)]:
        bw, bh = no_upscale_bucket(w, h, 512, 1024, 64)
        assert bw * bh <= 512 * 512 and bw % 64 == 0 and bh % 64 == 0 and bw >= 64 and bh >= 64
        assert bw <= max(w, 64) and bh <= max(h, 64)  # never upscaled, beyond the one-step minimum
    bw, bh = no_upscale_bucket(4000, 3000, 512, 1024, 64)
    assert (bw, bh) == (512, 384)  # exact 4:3 beats the larger 576x384


def test_upright_size_applies_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (120, 80)).save(path, exif=exif)
    assert upright_size(path) == (80, 120)


def items_with_sizes(sizes, repeats=3):
    items = [ImageItem(Path(f"/x/{i}.png"), "c", True, repeats, False, 0) for i in range(len(sizes))]
    return items, sizes


def test_batches_never_mix_buckets_constant_count_and_shuffled_across_buckets():
    sizes = [(64, 128)] * 3 + [(128, 64)] * 4 + [(96, 96)] * 2
    items, sizes = items_with_sizes(sizes)  # 9, 12 and 6 samples per epoch
    data = TrainingData(items, CaptionOptions(), 96, 4, seed=3, sizes=sizes)
    expected = math.ceil(9 / 4) + math.ceil(12 / 4) + math.ceil(6 / 4)
    first_sizes, last_sizes = set(), set()
    for epoch in range(8):
        batches = data.epoch_batches(epoch)
        assert len(batches) == expected
        assert sorted(p for b in batches for p in b) == list(range(27))
        for batch in batches:
            assert len({data.size_of(data.samples[p]) for p in batch}) == 1
        first_sizes.add(data.size_of(data.samples[batches[0][0]]))
        last_sizes.add(len(batches[-1]))
    assert len(first_sizes) > 1 and len(last_sizes) > 1  # partial batches are not always at the end
    assert data.epoch_batches(5) == TrainingData(items, CaptionOptions(), 96, 4, seed=3, sizes=sizes).epoch_batches(5)


def write_image(path: Path, size, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    pixels[: h // 2] //= 3  # some structure, so the tiny VAE sees more than noise
    Image.fromarray(pixels).save(path)


def make_dataset(root: Path, sizes) -> Path:
    folder = root / "train" / "5_thing"
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        write_image(folder / f"img{i}.png", size, i)
        (folder / f"img{i}.txt").write_text(f"thing, picture {i}", encoding="utf-8")
    return root / "train"


MIXED = [(200, 110), (180, 90), (100, 190), (90, 180), (150, 140), (120, 120)]  # landscape, portrait, square


def bucket_config(tmp: Path, sizes=MIXED, extra: str = "") -> Path:
    train = make_dataset(tmp, sizes)
    path = tmp / "run.toml"
    path.write_text(f"""
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train.as_posix()}"
resolution = 96
enable_buckets = true
bucket_reso_steps = 32
min_bucket_reso = 64
max_bucket_reso = 128
{extra}
[network]
rank = 2
alpha = 2
[train]
max_steps = 8
batch_size = 2
seed = 5
[save]
output_dir = "{(tmp / 'out').as_posix()}"
name = "b"
[logging]
log_dir = "{(tmp / 'logs').as_posix()}"
""", encoding="utf-8")
    return path


def test_three_aspect_ratios_train_end_to_end(tmp_path, monkeypatch, capsys):
    path = bucket_config(tmp_path)
    assert train_lora.main([str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "buckets (sides 64-128 px in steps of 32, area at most 96x96)" in out
    for row in ("64x128    0.50       2             10", "96x96    1.00       2             10",
                "128x64    2.00       2             10"):
        assert row in out, out
    assert "mean aspect-ratio error 0.047" in out
    assert "steps per epoch   : 15" in out  # 3 buckets × ceil(10 / 2)

    shapes = []
    original = LatentSource.latents

    def recording(self, batch, *args):
        latents = original(self, batch, *args)
        shapes.append(tuple(latents.shape))
        return latents

    monkeypatch.setattr(LatentSource, "latents", recording)
    assert train_lora.main([str(path)]) == 0
    assert "128x64" in capsys.readouterr().out  # the table is printed before training too
    assert len(shapes) == 8
    assert set(shapes) == {(2, 4, 16, 8), (2, 4, 12, 12), (2, 4, 8, 16)}
    assert (tmp_path / "out" / "b.safetensors").is_file()


def test_bucket_table_counts_repeats_and_error(tmp_path):
    train = make_dataset(tmp_path, [(200, 100), (100, 200), (100, 200)])
    items = [ImageItem(p, "", False, 5, False, 0) for p in sorted((train / "5_thing").glob("*.png"))]
    assignment = assign_buckets(items, BucketSettings(96, 64, 128, 32))
    assert assignment.sizes == [(128, 64), (64, 128), (64, 128)]
    assert assignment.rows(items) == [((64, 128), 2, 10), ((128, 64), 1, 5)]
    assert assignment.mean_aspect_error() == pytest.approx(0.0)


def config_problems(tmp_path, *overrides):
    path = bucket_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        read_config(path, list(overrides), LORA)
    return "\n".join(info.value.problems)


def test_bucket_settings_are_validated(tmp_path):
    text = config_problems(tmp_path, "dataset.min_bucket_reso=80", "dataset.max_bucket_reso=64")
    assert "dataset.min_bucket_reso = 80 is not a multiple of dataset.bucket_reso_steps = 32" in text
    assert "dataset.max_bucket_reso = 64 is below dataset.resolution = 96" in text


def test_bucket_keys_without_buckets_are_reported(tmp_path, capsys):
    path = bucket_config(tmp_path)
    assert train_lora.main([str(path), "--check", "dataset.enable_buckets=false"]) == 0
    out = capsys.readouterr().out
    assert "dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps have no effect" in out
    assert "buckets (" not in out
