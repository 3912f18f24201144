#!/usr/bin/env python
"""Benchmark the disk latent cache: images/s when encoding, and the cost of a second run (hash the images,
hash the VAE, check the files: no VAE work), on the built-in tiny model and on a full-size SD1.5 VAE
(library/models/model_configs/sd1/vae, random weights: speed does not depend on the weights) at 512 px.

    python bench/bench_cache.py [--tiny-images 32] [--sd-images 4] [--threads 2] [--device cpu] [--workers 0]

Never run by the tests. Prints one line per measurement and a Markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from library.quiet import quiet_libraries  # noqa: E402

quiet_libraries()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image  # noqa: E402

from library.data.latent_cache import DiskLatentCache, LatentEntry, vae_identity  # noqa: E402
from library.models.builtin import build_builtin  # noqa: E402


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """JPEG photos-to-be: smooth gradients plus noise, larger than the training size so resizing costs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        w, h = size
        gradient = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(gradient + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def sd15_vae() -> AutoencoderKL:
    config = json.loads((REPO / "library" / "model_configs" / "sd1" / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    return AutoencoderKL.from_config(config).eval()


def measure(name: str, vae, paths: list[Path], size: int, device: str, batch: int, workers: int) -> dict:
    vae = vae.to(device, torch.float32).requires_grad_(False)
    entries = [LatentEntry(p, size, size) for p in paths]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        first, _ = DiskLatentCache(Path(folder), vae).ensure(entries, batch, workers, verbose=False)
        first_total = time.perf_counter() - start
        start = time.perf_counter()
        identity = vae_identity(vae)
        identity_s = time.perf_counter() - start
        start = time.perf_counter()
        second, _ = DiskLatentCache(Path(folder), vae).ensure(entries, batch, workers, verbose=False)
        second_total = time.perf_counter() - start + identity_s  # a real second run hashes the VAE again
        size_mb = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors")) / 2**20
    assert first.encoded == len(paths) and second.encoded == 0 and second.reused == len(paths)
    row = {"model": name, "images": len(paths), "px": size, "first_s": first_total,
           "img_per_s": len(paths) / first.encode_seconds, "second_s": second_total, "vae_hash_s": identity_s,
           "cache_mb": size_mb, "vae_id": identity[:8]}
    print(f"{name}: {len(paths)} images at {size}px: first run {first_total:.2f} s "
          f"({row['img_per_s']:.2f} img/s encoding), second run {second_total:.3f} s "
          f"(of which VAE hash {identity_s:.3f} s), cache {size_mb:.1f} MiB")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-images", type=int, default=32)
    parser.add_argument("--tiny-px", type=int, default=128)
    parser.add_argument("--sd-images", type=int, default=4)
    parser.add_argument("--sd-px", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (0 = up to 8)")
    parser.add_argument("--batch", type=int, default=1, help="VAE batch size (dataset.vae_batch_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device {args.device} ({device_name}), torch threads {torch.get_num_threads()}, "
          f"VAE batch {args.batch}, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny_images:
            paths = make_images(Path(tmp) / "tiny", args.tiny_images, (args.tiny_px * 3 // 2, args.tiny_px * 2))
            rows.append(measure("tiny-sd15 VAE", build_builtin("tiny-sd15").vae, paths, args.tiny_px, args.device,
                                args.batch, args.workers))
        if args.sd_images:
            paths = make_images(Path(tmp) / "sd", args.sd_images, (args.sd_px * 3 // 2, args.sd_px * 2))
            rows.append(measure("SD1.5 VAE", sd15_vae(), paths, args.sd_px, args.device, args.batch, args.workers))
    print("\n| VAE | images | size | first run | encoding | second run | of which VAE hash | cache size |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['images']} | {r['px']} px | {r['first_s']:.2f} s | {r['img_per_s']:.2f} img/s | "
              f"{r['second_s']:.3f} s | {r['vae_hash_s']:.3f} s | {r['cache_mb']:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
