#!/usr/bin/env python
"""How long the command lines take to answer: `--help` of every root script and tool, and `--check` on the
quick-start configs, each run as users run it (a fresh interpreter), median of several runs after one warm-up
run (so the disk cache is warm: cold starts are not what this measures).

    .venv/bin/python bench/bench_cli.py [--runs 5]

Targets (issue "Instant, honest command line"): --help under 1 s, --check under 3 s on a 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELP = ["train_lora.py", "train_textual_inversion.py", "train_dreambooth.py", "prepare_buckets.py", "compare.py",
        "tag_images.py", "tools/convert_model.py", "tools/extract_lora.py", "tools/merge_lora.py",
        "tools/make_sample_dataset.py"]
CHECK = [("train_lora.py", "configs/quickstart_lora.toml"), ("train_textual_inversion.py", "configs/quickstart_ti.toml"),
         ("train_dreambooth.py", "configs/quickstart_dreambooth.toml")]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def median_of(command: list[str], runs: int) -> float:
    timed(command)  # warm-up: the disk cache holds the libraries afterwards
    return statistics.median(timed(command) for _ in range(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU core(s), Python "
          f"{platform.python_version()}; median of {args.runs} runs after a warm-up run\n")
    print(f"{'command':<58} {'seconds':>8}  target")
    for script in HELP:
        seconds = median_of([python, script, "--help"], args.runs)
        print(f"{script + ' --help':<58} {seconds:>8.2f}  {'ok' if seconds < 1 else 'OVER'} (< 1 s)")
    for script, config in CHECK:
        seconds = median_of([python, script, config, "--check"], args.runs)
        print(f"{script + ' ' + config + ' --check':<58} {seconds:>8.2f}  {'ok' if seconds < 3 else 'OVER'} (< 3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
