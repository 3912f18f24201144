#!/usr/bin/env python
"""Peak memory of `train_lora.py` on a full-size SD1.5 single file, run exactly as users run it.

    python bench/bench_memory.py [--configs bf16,fp32] [--steps 3] [--resolution 256] [--threads 2]
                                 [--model /tmp/kiln-bench/sd15-random-fp32.safetensors]

The model file is written once (seeded random weights, the full SD1.5 architecture from
library/models/model_configs/sd1, fp32 like a "pruned" original checkpoint; ~4.3 GB) and reused. Each config
trains a LoRA (rank 16 / alpha 8 on the UNet and the text encoder, AdamW, latents cached in memory, SDPA,
batch 1) on 8 generated images × 10 repeats for a few steps, in its own process, one at a time:

- peak RSS: the child's high-water mark (`ru_maxrss` from wait4), what `/usr/bin/time -v` reports;
- RSS during steps: the largest RSS sampled (psutil, every 0.2 s) after the run printed its TensorBoard line
  (latents cached, the loop about to start);
- seconds from start to exit.

Never run by the tests. Prints one line per config and a Markdown table at the end.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(tempfile.gettempdir()) / "kiln-bench" / "sd15-random-fp32.safetensors"
SD15_SEED = 1234
PRECISIONS = {"bf16": "bf16", "fp32": "no"}
GIB = 2**30

_WRITE_MODEL = """
import sys
from pathlib import Path
import torch
from library.models.builtin import build_random
from library.models.paths import CONFIG_ROOT
from library.models.single_file import save_single_file
parts = build_random(CONFIG_ROOT / "sd1", {seed}, "sd15-random")
save_single_file(parts, Path(sys.argv[1]), torch.float32)
"""


def write_model(path: Path) -> None:
    """The full-size SD1.5 single file with seeded random weights, written once in a child process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing {path} (full-size SD1.5, random weights, fp32) ...", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _WRITE_MODEL.format(seed=SD15_SEED), str(path)], cwd=REPO, check=True)
    print(f"  {path.stat().st_size / GIB:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)


def write_dataset(folder: Path, count: int = 8, size: int = 320) -> Path:
    """`count` captioned images (smooth colour fields plus noise) in <folder>/train/10_pot/."""
    import numpy as np
    from PIL import Image

    images = folder / "train" / "10_pot"
    images.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng(index)
        ramp = np.linspace(0, 255, size)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(ramp + rng.normal(0, 16, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"pot_{index:02d}.png")
        (images / f"pot_{index:02d}.txt").write_text(f"a photo of a pot, style {index}", encoding="utf-8")
    return folder / "train"


def write_config(folder: Path, model: Path, train_dir: Path, precision: str, args: argparse.Namespace) -> Path:
    config = folder / f"lora_{precision}.toml"
    config.write_text(f"""trainer = "lora"
[model]
path = "{model.as_posix()}"
[dataset]
train_dir = "{train_dir.as_posix()}"
resolution = {args.resolution}
cache_latents = "memory"
[network]
rank = 16
alpha = 8
[optimizer]
name = "AdamW"
lr = 1e-4
[train]
max_steps = {args.steps}
batch_size = 1
mixed_precision = "{PRECISIONS[precision]}"
attention = "sdpa"
device = "cpu"
num_threads = {args.threads}
seed = 1
[save]
output_dir = "{(folder / 'out').as_posix()}"
name = "bench_{precision}"
overwrite = true
[logging]
log_dir = "{(folder / 'logs').as_posix()}"
""", encoding="utf-8")
    return config


def run_config(config: Path, log: Path, repo: Path) -> dict:
    """Run `repo`/train_lora.py on `config` in a child process; its peak RSS, RSS during steps and seconds."""
    import psutil

    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        child = subprocess.Popen([sys.executable, "train_lora.py", str(config)], cwd=repo, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})  # lines as they are printed
        watched = psutil.Process(child.pid)
        state = {"steps_started": False, "steady": 0, "loop_at": None}

        def sample() -> None:
            while child.poll() is None:
                try:
                    rss = watched.memory_info().rss
                except psutil.Error:
                    return
                if state["steps_started"]:
                    state["steady"] = max(state["steady"], rss)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for line in child.stdout:
            out.write(line)
            out.flush()
            if line.startswith("TensorBoard:") and not state["steps_started"]:
                state["steps_started"], state["loop_at"] = True, time.perf_counter() - start
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        sampler.join(timeout=1)
    seconds = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"{config.name} failed (exit {child.returncode}); see {log}")
    return {"peak_gib": usage.ru_maxrss * 1024 / GIB, "steady_gib": state["steady"] / GIB,
            "setup_s": state["loop_at"] or float("nan"), "seconds": seconds}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="bf16,fp32", help=f"comma-separated, from: {', '.join(PRECISIONS)}")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the SD1.5 file (written when missing)")
    parser.add_argument("--steps", type=int, default=3, help="train.max_steps of each run")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="train.num_threads")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="the Kiln tree whose train_lora.py runs (e.g. an unpacked `git archive` of an earlier "
                             "commit, to measure before and after)")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in PRECISIONS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(PRECISIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.is_file():
        write_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-memory-") as scratch:
        folder = Path(scratch)
        train_dir = write_dataset(folder)
        for precision in args.configs.split(","):
            config = write_config(folder, args.model, train_dir, precision, args)
            result = run_config(config, Path(tempfile.gettempdir()) / f"kiln-bench-memory-{precision}.log", args.repo)
            rows.append((precision, result))
            print(f"{precision}: peak RSS {result['peak_gib']:.2f} GiB, during steps {result['steady_gib']:.2f} GiB, "
                  f"setup {result['setup_s']:.1f} s, total {result['seconds']:.1f} s", flush=True)
    print(f"\n{args.repo}/train_lora.py, {args.model.name}, LoRA rank 16 on UNet + text encoder, {args.resolution} px, "
          f"{args.steps} steps, {args.threads} threads\n")
    print("| config | peak RSS | RSS during steps | setup (to first step) | total |\n|---|---|---|---|---|")
    for precision, r in rows:
        print(f"| {precision} | {r['peak_gib']:.2f} GiB | {r['steady_gib']:.2f} GiB | {r['setup_s']:.1f} s | "
              f"{r['seconds']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
