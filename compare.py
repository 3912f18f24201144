#!/usr/bin/env python
"""Compare checkpoints and settings in one labelled X/Y/Z grid (like A1111's X/Y/Z plot), to pick the best epoch.

    python compare.py --config run.toml --prompt "a photo of sks dog" \
        --x lora "output/lora-*.safetensors" --y multiplier 0.5,1 --z seed 1,2

Axis kinds: model (full checkpoints), lora, embedding (files, globs, 'none'), hypernetwork (files with an optional
strength, hn.pt:0.5), multiplier, sr (prompt search/replace: the first value is searched for and replaced by each
value), seed, cfg, steps, sampler.
Writes <output>/grid.png and every single image to <output>/cells/, with the settings in the PNG text.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from library.cli import run_main
from library.sampling.compare_axes import AXIS_KINDS, CompareError, Settings, parse_axis, split_strength
from library.sampling.prompt_file import canonical_sampler


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="axis kinds: " + "; ".join(f"{k} = {v}" for k, v in AXIS_KINDS.items()))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a training TOML: its model.path (and clip_skip, resolution) is the base")
    source.add_argument("--model", help='base model: "builtin:tiny-sd15", a diffusers folder or a checkpoint file')
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative", default="")
    for name in "xyz":
        parser.add_argument(f"--{name}", nargs=2, metavar=("KIND", "VALUES"), help=f"the {name.upper()} axis")
    parser.add_argument("--lora", default="",
                        help="a LoRA, LoHa or LoKr file applied to every cell (unless an axis sets it)")
    parser.add_argument("--multiplier", type=float, default=1.0)
    parser.add_argument("--hypernetwork", default="", metavar="FILE[:STRENGTH]",
                        help="an A1111 hypernetwork applied to every cell (unless an axis sets it), strength 1 "
                             "unless given")
    parser.add_argument("--embedding", default="", help="an embedding loaded for every cell")
    parser.add_argument("--token", default="", help="the word embeddings load as (default: the file's name)")
    parser.add_argument("--width", type=int, default=0, help="default: the model's native size (512 for SD1.5)")
    parser.add_argument("--height", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="euler_a")
    parser.add_argument("--clip-skip", type=int, default=0, help="default: the config's, else 1")
    parser.add_argument("--font-size", type=int, default=0, help="label size in pixels (default: from the cell size)")
    parser.add_argument("--output", default="compare", help="folder for grid.png and cells/")
    return parser.parse_args(argv)


def base_from_config(path: str) -> dict:
    """model.path, clip_skip, v_parameterization, config_dir and dataset.resolution of a training TOML."""
    config = Path(path)
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise CompareError(f"--config {path}: cannot read it as TOML ({err})") from None
    model = data.get("model", {})
    if not isinstance(model, dict) or not model.get("path"):
        raise CompareError(f"--config {path}: it has no model.path; give the base model with --model instead")
    model_path = str(model["path"])
    if not model_path.startswith("builtin:") and not Path(model_path).expanduser().exists():
        beside = config.parent / model_path  # presets name models relative to themselves
        model_path = str(beside) if beside.exists() else model_path
    v_param = model.get("v_parameterization", "auto")
    train = data.get("train", {}) if isinstance(data.get("train"), dict) else {}
    return {"model": model_path, "clip_skip": int(model.get("clip_skip", 1)),
            "max_token_length": int(train.get("max_token_length", 75)),
            "v_parameterization": None if v_param == "auto" else bool(v_param),
            "config_dir": str(model.get("config_dir", ""))}


def main(argv: list[str] | None = None) -> int:
    """The command line: returns its exit code (2 for a problem with the arguments, files or settings)."""
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    found = base_from_config(args.config) if args.config else {"model": args.model}
    base = Settings(prompt=args.prompt, negative_prompt=args.negative, width=args.width, height=args.height,
                    steps=args.steps, cfg=args.cfg, seed=args.seed, sampler=canonical_sampler(args.sampler),
                    lora=args.lora, multiplier=args.multiplier, embedding=args.embedding, token=args.token, **found)
    if args.clip_skip:
        base.clip_skip = args.clip_skip
    if args.hypernetwork:
        path, strength = split_strength(args.hypernetwork)
        if not Path(path).is_file():
            raise CompareError(f"--hypernetwork: file not found: {path}")
        base.hypernetwork, base.hypernetwork_strength = path, 1.0 if strength is None else strength
    axes = [parse_axis(*getattr(args, name)) if getattr(args, name) else None for name in "xyz"]
    if base.width % 8 or base.height % 8:
        raise CompareError(f"--width/--height {base.width}x{base.height} must be multiples of 8")
    from library.quiet import quiet_libraries

    quiet_libraries()  # the arguments are good: now load the model libraries, without their banners
    from library.sampling.compare import render

    print(f"grid: {render(base, axes, Path(args.output), args.font_size or None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
