#!/usr/bin/env python
"""Benchmark the training scripts as users run them: s/step, setup seconds, peak memory and the overhead
ratio against the bare UNet (+ text encoder) forward+backward+optimizer step measured in the same process.

    .venv/bin/python bench/bench_scripts.py                 # full-size SD1.5 file, the default settings
    .venv/bin/python bench/bench_scripts.py --model tiny    # the same machinery on builtin:tiny-sd15, seconds
    .venv/bin/python bench/bench_scripts.py --scripts lora --configs 256-fp32,512-bf16 --runs 3 --write-docs

Each measured run is its own process that calls train_lora.py / train_textual_inversion.py /
train_dreambooth.py's ``main([config.toml])`` on a generated config, exactly as ``python train_lora.py
config.toml`` would, with hooks that only observe (bench/bench_scripts_child.py). bench/README.md explains
every column.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for folder in (BENCH, REPO):  # the sibling modules, and `library`
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_scripts_inputs import (  # noqa: E402
    CACHE, MODEL_NAME, SCRIPTS, TINY_MODEL, BenchConfig, ensure_dataset, ensure_model_file, write_config)

LORA_CONFIGS = ("256-fp32", "256-fp32-gc", "256-fp32-cl", "256-bf16", "512-bf16", "512-fp32")
OTHER_CONFIGS = ("256-fp32",)  # textual inversion and DreamBooth, unless --configs says otherwise
MODELS = {"sd15": "the full-size SD1.5 architecture as an fp32 single file, seeded random weights",
          "tiny": "the built-in tiny SD1.5"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15",
                        help="sd15 (default: the full SD1.5 architecture, written once to bench/.cache/), tiny "
                             "(builtin:tiny-sd15), or any model.path value (your own checkpoint)")
    parser.add_argument("--scripts", default="lora,ti,dreambooth", help="comma-separated from: lora, ti, dreambooth")
    parser.add_argument("--configs", default="",
                        help="comma-separated RESOLUTION-PRECISION[-gc][-cl][-compile] (256-fp32, 512-bf16, 256-fp32-gc ...) for "
                             f"every script; default: {','.join(LORA_CONFIGS)} for lora, "
                             f"{','.join(OTHER_CONFIGS)} for ti and dreambooth")
    parser.add_argument("--runs", type=int, default=1, help="processes per script and setting (pooled)")
    parser.add_argument("--steps", type=int, default=8,
                        help="train.max_steps; steps 2..STEPS are timed (step 1 warms up)")
    parser.add_argument("--threads", type=int, default=2, help="train.num_threads (0 = torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="train.device")
    parser.add_argument("--bare-iters", type=int, default=5,
                        help="bare forward+backward+optimizer iterations timed after one warm-up")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the last step of each run (torch.profiler, CPU) and print where its time "
                             "goes; that step is not timed (profiling slows it)")
    parser.add_argument("--write-docs", nargs="?", const=str(REPO / "docs" / "BENCHMARKS.md"), metavar="PATH",
                        help="write the results to docs/BENCHMARKS.md (or PATH)")
    parser.add_argument("--cache", default=str(CACHE), metavar="DIR",
                        help=f"where the SD1.5 file ({MODEL_NAME}) and the dataset are kept (default bench/.cache)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config override every run gets, as on the scripts' own command line "
                             "(optimizer.max_grad_norm=0, dataset.cache_text_encoder_outputs=true); repeatable")
    parser.add_argument("--verbose", action="store_true", help="show each run's own output as it runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--script", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--build-model", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child or args.build_model:
        return args
    scripts = [s.strip() for s in args.scripts.split(",") if s.strip()]
    unknown = [s for s in scripts if s not in SCRIPTS]
    if not scripts or unknown:
        parser.error(f"--scripts: {', '.join(unknown) or 'none given'}: choose from {', '.join(SCRIPTS)}")
    try:
        chosen = [BenchConfig.parse(c) for c in args.configs.split(",") if c.strip()]
    except ValueError as err:
        parser.error(f"--configs: {err}")
    args.plan = [(script, setting) for script in scripts
                 for setting in (chosen or [BenchConfig.parse(c) for c in
                                            (LORA_CONFIGS if script == "lora" else OTHER_CONFIGS)])]
    args.configs_given = bool(chosen)
    if args.steps < 3 and args.profile:
        parser.error("--profile profiles the last step and times steps 2.. before it: use --steps 3 or more")
    if args.steps < 2 or args.runs < 1 or args.bare_iters < 1 or args.threads < 0:
        parser.error("--steps must be at least 2 (step 1 is not timed), --runs and --bare-iters at least 1")
    return args


def cpu_without_bf16(device: str) -> bool:
    """True when the runs use the CPU and oneDNN has no bf16 kernels for it (no AVX-512): bf16 convolutions
    then take a slow fallback, and an SD1.5 step at 256 px takes minutes instead of seconds."""
    import torch

    from library.training.device import cpu_has_bf16  # the check the trainers print their note from

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return False
    return not cpu_has_bf16()


def drop_slow_bf16(args: argparse.Namespace) -> None:
    """Leave bf16 settings out of the default plan on a CPU without bf16 kernels (say so); warn when asked for."""
    bf16 = [(script, s) for script, s in args.plan if s.precision == "bf16"]
    if not bf16 or args.model == "tiny" or not cpu_without_bf16(args.device):
        return
    names = ", ".join(f"{script} {s.label}" for script, s in bf16)
    if args.configs_given:
        print(f"note: this CPU has no bf16 kernels (oneDNN, AVX-512): {names} will be very slow", flush=True)
        return
    args.plan = [(script, s) for script, s in args.plan if s.precision != "bf16"]
    print(f"note: skipping {names}: this CPU has no bf16 kernels (oneDNN needs AVX-512), so bf16 convolutions take "
          "a slow fallback (minutes per SD1.5 step); name them in --configs to run them anyway", flush=True)


def model_path(choice: str, cache: Path) -> str:
    if choice == "tiny":
        return TINY_MODEL
    if choice == "sd15":
        return str(ensure_model_file(cache / MODEL_NAME))
    return choice


def run_one(args: argparse.Namespace, script: str, setting: BenchConfig, model: str, index: int,
            folder: Path) -> dict | None:
    """One measured process; its result dict, or None (after its output) when it failed."""
    run_folder = folder / f"{script}-{setting.label}-{index}"
    run_folder.mkdir()
    config = write_config(run_folder, script, setting, model, args.dataset, args.steps, args.threads, args.device)
    result_file = run_folder / "result.json"
    command = [sys.executable, str(BENCH / "bench_scripts.py"), "--child", "--script", SCRIPTS[script],
               "--label", setting.label, "--config", str(config), "--result-file", str(result_file),
               "--bare-iters", str(args.bare_iters)] + (["--profile"] if args.profile else [])
    command += [f"--set={override}" for override in args.overrides]
    print(f"{script} {setting.label} run {index}: python {SCRIPTS[script]}.py {config.name} "
          f"{' '.join(args.overrides)}".rstrip() + " ...", flush=True)
    log = run_folder / "output.log"
    with open(log, "w", encoding="utf-8") as handle:
        out = None if args.verbose else handle
        code = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None)
    if code != 0 or not result_file.is_file():
        if not args.verbose:
            print(log.read_text(encoding="utf-8", errors="replace")[-6000:], file=sys.stderr)
        print(f"error: {script} {setting.label} run {index} failed (exit code {code})", file=sys.stderr)
        return None
    result = json.loads(result_file.read_text(encoding="utf-8"))
    if result.get("profile"):
        from bench_scripts_profile import format_profile

        print(format_profile(result["profile"]))
    return result


def shown(path: str | Path) -> str:
    """A path as the docs show it: relative to the repository when inside it (no machine-specific prefix)."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def setting_lines(args: argparse.Namespace, model: str) -> list[str]:
    timed_last = args.steps - 1 if args.profile else args.steps  # --profile: the last step is profiled instead
    return [
        f"model: {model if model.startswith('builtin:') else shown(model)} "
        f"({MODELS.get(args.model, 'given with --model')})",
        f"dataset: {shown(args.dataset)}: 8 images in 10_concept (8 x 10 repeats = 80 steps per "
        "epoch), latents cached in memory, batch size 1, SDPA attention, AdamW (lr from each script's defaults)",
        "lora: rank 16 / alpha 8 on the UNet and the text encoder; ti: one vector; dreambooth: the whole UNet "
        "(text encoder frozen)",
        f"train.max_steps = {args.steps}: s/step = median of steps 2..{timed_last} of every run; "
        f"bare = median of {args.bare_iters} iteration(s) after one warm-up; train.num_threads = {args.threads}; "
        f"train.device = {args.device}",
    ] + ([f"overrides on every run's command line: {' '.join(args.overrides)}"] if args.overrides else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_model:
        from bench_scripts_inputs import build_model_file

        build_model_file(Path(args.build_model))
        return 0
    if args.child:
        from bench_scripts_child import run_child

        return run_child(args.script, args.label, Path(args.config), Path(args.result_file), args.bare_iters,
                         args.profile, args.overrides)
    from bench_scripts_report import Row, docs_text, machine, raw_lines, table, write_docs

    load = os.getloadavg()
    drop_slow_bf16(args)
    cache = Path(args.cache).resolve()
    model = model_path(args.model, cache)
    args.dataset = ensure_dataset(cache / "dataset")
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="kiln-bench-scripts-") as tmp:
        for script, setting in args.plan:
            runs = [r for i in range(1, args.runs + 1) if (r := run_one(args, script, setting, model, i, Path(tmp)))]
            failed += args.runs - len(runs)
            if runs:
                rows.append(Row(script, setting.label, runs))
    if not rows:
        return 1
    machine_lines = machine(load, [r for row in rows for r in row.runs])
    print("\n" + "\n".join(machine_lines + [f"- {line}" for line in setting_lines(args, model)]) + "\n")
    print(table(rows))
    print("\n" + "\n".join(raw_lines(rows)))
    if args.write_docs:
        command = "python bench/bench_scripts.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = docs_text(command.strip(), setting_lines(args, model), rows, machine_lines)
        write_docs(Path(args.write_docs), text)
        print(f"\nwrote {args.write_docs}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
