#!/usr/bin/env python
"""How long `train_lora.py CONFIG --check` takes on a large synthetic dataset: folder scan, caption reads, the
decode check of every image, bucket assignment and the plan, exactly as users run it.

    python bench/bench_dataset.py [--images 10000] [--runs 3] [--repo PATH] [--profile]
    python bench/bench_dataset.py --batch-costs

`--batch-costs` instead measures what the training loop spends per image on data, to decide whether DataLoader
workers would pay: decoding and resizing a photo-sized JPEG to 512 px (what dataset.cache_latents = "off" does
every step, before the VAE) and reading one 512 px latent entry from the disk cache (what "disk" does).

The dataset is generated once into /tmp/kiln-bench-dataset-<images>/ (small 64×48, 48×64 and 64×64 PNG and
JPEG files with a caption each, spread over four NN_name folders) and reused. The model is the built-in tiny
one (`--check` reads no weights). Each run is a fresh process; the table reports the median and the
fastest wall time. `--profile` runs one more `--check` under cProfile and prints the 25 most expensive
functions (cumulative time). `--repo` runs another Kiln tree's train_lora.py (an unpacked `git archive` of an
earlier commit) on the same data, for before/after numbers.

Never run by the tests.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = ((64, 48), (48, 64), (64, 64))
FOLDERS = ("10_cat", "5_dog", "2_bird", "1_fish")


def write_dataset(root: Path, count: int) -> Path:
    """`count` captioned images in <root>/train/NN_name/ (written once; a marker file says it is complete)."""
    marker = root / ".complete"
    train = root / "train"
    if marker.is_file():
        return train
    import numpy as np
    from PIL import Image

    print(f"writing {count} images to {train} ...", flush=True)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = train / FOLDERS[index % len(FOLDERS)]
        folder.mkdir(parents=True, exist_ok=True)
        width, height = SIZES[index % len(SIZES)]
        ramp = np.linspace(0, 255, width)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(ramp + rng.normal(0, 24, (height, width, 3)), 0, 255).astype(np.uint8)
        suffix = ".jpg" if index % 2 else ".png"
        Image.fromarray(pixels).save(folder / f"img_{index:06d}{suffix}")
        (folder / f"img_{index:06d}.txt").write_text(f"a photo, tag{index % 97}, style {index % 13}", encoding="utf-8")
    marker.write_text("", encoding="utf-8")
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    return train


def write_config(folder: Path, train: Path) -> Path:
    config = folder / "check.toml"
    config.write_text(f"""trainer = "lora"
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{train.as_posix()}"
resolution = 64
enable_buckets = true
bucket_reso_steps = 16
[train]
epochs = 2
batch_size = 4
device = "cpu"
[save]
output_dir = "{(folder / 'out').as_posix()}"
name = "check"
[logging]
log_dir = "{(folder / 'logs').as_posix()}"
""", encoding="utf-8")
    return config


def timed_check(repo: Path, config: Path, profile: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one `--check` in a fresh process. CPU time (user + system, all
    threads) is the fairer number on a machine shared with other jobs."""
    command = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else []) + [
        "train_lora.py", str(config), "--check"]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # the child's own resource usage, reaped here
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"--check failed (exit {child.returncode}):\n{output}")
    return seconds, usage.ru_utime + usage.ru_stime, output


def print_profile(profile: Path) -> None:
    import pstats

    stats = pstats.Stats(str(profile))
    stats.sort_stats("cumulative").print_stats(25)


def batch_costs(count: int = 32) -> None:
    """Per-image data costs of one training step (see the module docstring), on this machine."""
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from library.data.batches import TrainingData
    from library.data.captions import CaptionOptions
    from library.data.folders import ImageItem
    from library.data.latent_cache import DiskLatentCache, LatentEntry
    from library.models.builtin import read_json
    from library.models.paths import CONFIG_ROOT

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-batch-") as scratch:
        folder = Path(scratch)
        rng = np.random.default_rng(0)
        items = []
        for index in range(count):
            ramp = np.linspace(0, 255, 1024)[None, :, None] * rng.random(3)[None, None, :]
            pixels = np.clip(ramp + rng.normal(0, 24, (768, 1024, 3)), 0, 255).astype(np.uint8)
            path = folder / f"photo_{index:03d}.jpg"
            Image.fromarray(pixels).save(path, quality=92)
            items.append(ImageItem(path, "c", True, 1, False, 0))
        data = TrainingData(items, CaptionOptions(), 512, 1, seed=1, flip_aug=False, sizes=[(512, 512)] * count)
        start = time.perf_counter()
        for index in range(count):
            data.pixels(index, False)
        decode = (time.perf_counter() - start) / count
        with init_empty_weights():  # only its config is used: the latent shape of each entry
            vae = AutoencoderKL.from_config(read_json(CONFIG_ROOT / "sd1" / "vae" / "config.json"))
        cache = DiskLatentCache(folder / "cache", vae, vae_id="bench")
        entries = [LatentEntry(item.path, 512, 512) for item in items]
        files = [cache.file_for(f"{index:064d}", entry) for index, entry in enumerate(entries)]
        for index, (path, entry) in enumerate(zip(files, entries)):
            cache.write(path, f"{index:064d}", entry, torch.randn(4, 64, 64), torch.rand(4, 64, 64))
        start = time.perf_counter()
        for index, (path, entry) in enumerate(zip(files, entries)):
            cache.load(path, f"{index:064d}", entry)
        read = (time.perf_counter() - start) / count
    print(f"per image, one thread: decode + resize a 1024x768 JPEG to 512x512 {decode * 1e3:.1f} ms; "
          f"read a 512 px latent from the disk cache {read * 1e3:.2f} ms")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3, help="timed --check runs (fresh processes)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the Kiln tree whose train_lora.py runs")
    parser.add_argument("--profile", action="store_true", help="also profile one --check with cProfile")
    parser.add_argument("--batch-costs", action="store_true",
                        help="measure per-image data costs of a training step instead (DataLoader workers or not)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_costs:
        batch_costs()
        return 0
    train = write_dataset(Path(tempfile.gettempdir()) / f"kiln-bench-dataset-{args.images}", args.images)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-dataset-") as scratch:
        config = write_config(Path(scratch), train)
        seconds, cpu, output = [], [], ""
        for _ in range(args.runs):
            elapsed, used, output = timed_check(args.repo, config)
            seconds.append(elapsed)
            cpu.append(used)
            print(f"--check: {elapsed:.2f} s wall, {used:.2f} s CPU", flush=True)
        print("\n".join(line for line in output.splitlines() if line.startswith(("total", "  total", "config"))))
        if args.profile:
            profile = Path(scratch) / "check.prof"
            timed_check(args.repo, config, profile)
            print_profile(profile)
    print(f"\n{args.repo}/train_lora.py --check on {args.images} images ({len(FOLDERS)} folders, "
          f"{', '.join(f'{w}x{h}' for w, h in SIZES)} PNG/JPEG):\n")
    print("| images | runs | median wall | fastest wall | median CPU |\n|---|---|---|---|---|")
    print(f"| {args.images} | {len(seconds)} | {statistics.median(seconds):.2f} s | {min(seconds):.2f} s | "
          f"{statistics.median(cpu):.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
