"""What keeps large datasets fast and within RAM: the scan opens each image once (checks it and reads its size;
buckets reuse the size), a PNG is checked through its checksums without inflating its pixels (damage anywhere
is still caught), and the disk latent cache reads latents per batch, never all at once."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from library.data import images as images_module
from library.data.batches import Batch
from library.data.buckets import BucketSettings, assign_buckets, upright_size
from library.data.folders import scan_subsets, subsets_from_folder
from library.data.latent_cache import DiskLatentCache
from library.data.sources import LatentSource
from library.models.builtin import build_builtin
from tests.data.test_latent_cache import small_data


def noisy_png(size=(40, 30), exif: Image.Exif | None = None) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", **({"exif": exif} if exif is not None else {}))
    return out.getvalue()


def test_a_png_damaged_anywhere_is_refused_without_decoding_the_good_ones(tmp_path, monkeypatch):
    folder = tmp_path / "1_cat"
    folder.mkdir()
    data = noisy_png()
    (folder / "good.png").write_bytes(data)
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0xFF  # one flipped byte inside the image data: its chunk's checksum fails
    (folder / "flipped.png").write_bytes(bytes(middle))
    (folder / "cut.png").write_bytes(data[:-30])
    decoded = []
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(self) or None)
    scan = scan_subsets(subsets_from_folder(tmp_path), workers=1)
    assert [item.path.name for item in scan.items] == ["good.png"]
    assert sorted(path.name for path, _ in scan.bad_images) == ["cut.png", "flipped.png"]
    assert decoded == []  # checked through checksums alone


def test_the_scan_opens_each_image_once_and_buckets_reuse_its_sizes(tmp_path, monkeypatch):
    folder = tmp_path / "2_cat"
    folder.mkdir()
    exif = Image.Exif()
    exif[images_module.EXIF_ORIENTATION] = 6  # stored landscape, shown portrait
    (folder / "rotated.png").write_bytes(noisy_png((60, 30), exif))
    Image.new("RGB", (48, 64)).save(folder / "tall.jpg")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k))
    scan = scan_subsets(subsets_from_folder(tmp_path), workers=1)
    assignment = assign_buckets(scan.items, BucketSettings(64, 32, 128, 16))
    assert sorted(opened) == ["rotated.png", "tall.jpg"]
    assert assignment.image_sizes == [(30, 60), (48, 64)]  # EXIF rotation applied from the PNG's header
    assert upright_size(folder / "rotated.png") == (30, 60)


def test_the_disk_cache_reads_latents_per_batch_and_keeps_none_in_memory(tmp_path, monkeypatch):
    source = LatentSource(small_data(tmp_path), build_builtin("tiny-sd15").vae, "disk", seed=4,
                          cache_dir=tmp_path / "cache")
    source.fill()
    reads = []
    real_load = DiskLatentCache.load
    monkeypatch.setattr(DiskLatentCache, "load", lambda self, path, *a: reads.append(path) or real_load(self, path, *a))
    batch = Batch([], [2, 0], ["c", "c"], [False, True])
    latents = source.latents(batch, 0, 1)
    assert latents.shape[0] == 2 and len(reads) == 2  # this batch's two files, read now
    assert source.memory == {}  # nothing held between batches: a dataset larger than RAM trains
