"""Merge one or more network files (kohya LoRA/LoCon, LyCORIS LoHa/LoKr, or token rows from embedding fine-tuning)
into a Stable Diffusion model at given weights and save the result.

    python tools/merge_lora.py BASE OUT --lora style.safetensors:0.8 --lora char.safetensors:0.5

BASE: builtin:tiny-sd15, a diffusers folder, a .safetensors/.ckpt file or a locally cached hub id.
OUT ending in .safetensors → original SD single file (A1111, ComfyUI); anything else → diffusers folder.
Each --lora is FILE[:WEIGHT] (weight 1 when left out); W += weight · ΔW, file by file, with ΔW as A1111 and
ComfyUI compute it (LoRA up·down·alpha/rank; LoHa and LoKr as in README "LyCORIS: LoHa and LoKr"). A token-rows
file (train_embedding_finetune.py) sets its rows of the token-embedding table: row = base + weight · (trained − base).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# tools/ is a subfolder: make `library` importable when run as `python tools/merge_lora.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402

PRECISIONS = ("fp16", "bf16", "fp32")


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """"file.safetensors:0.8" → (file, 0.8); no weight → 1.0. Only a number after the last ':' is a weight,
    so Windows paths ("C:\\x.safetensors") keep their drive letter."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="model to merge into")
    parser.add_argument("out", help="output .safetensors file or diffusers folder")
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                        help="a LoRA, LoHa or LoKr file, or token rows from embedding fine-tuning, and its weight; "
                             "repeat for several")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="weight precision to write (default: fp16 for .safetensors, fp32 for folders)")
    parser.add_argument("--config-dir", help="diffusers folder whose configs describe a single-file BASE")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    return parser.parse_args(argv)


def merge_files(parts, specs: list[tuple[Path, float]]) -> list[str]:
    """Merge each network file into parts in place; returns one line per file. NetworkFileError for files that
    are not LoRA/LoHa/LoKr networks or token rows for this model."""
    from library.models.header import header_of
    from library.networks.compat import network_file_problem
    from library.networks.kinds import file_layouts, kind_of_weights
    from library.networks.merge import NetworkFileError, merge_network, read_network_file
    from library.networks.token_rows import apply_token_rows, is_token_rows, token_rows_problem

    lines = []
    for path, weight in specs:
        weights, metadata = read_network_file(path)
        if is_token_rows(weights):
            if problem := token_rows_problem(path, weights, metadata, header_of(parts)):
                raise NetworkFileError(problem)
            rows = apply_token_rows(parts, weights, weight)
            lines.append(f"merged {path} at weight {weight:g} ({rows} token-embedding rows)")
            continue
        shapes = {key: tuple(tensor.shape) for key, tensor in weights.items()}
        if problem := network_file_problem(path, shapes, metadata, header_of(parts)):
            raise NetworkFileError(problem)
        kind = kind_of_weights(weights)
        if kind is None:
            raise NetworkFileError(f"{path} holds no LoRA, LoHa or LoKr modules (kohya/LyCORIS layout: "
                                   f"{file_layouts()}) and no token rows; other formats cannot be merged by this tool")
        modules = len(kind.module_names(weights))
        unmatched = merge_network(parts, {k: v.float() for k, v in weights.items()}, weight)
        if unmatched:
            raise NetworkFileError(f"{path}: {len(unmatched)} of its {modules} modules match nothing in the base "
                                   f"model (e.g. {unmatched[0]}); was it trained on another model family?")
        lines.append(f"merged {path} at weight {weight:g} ({modules} {kind.name} modules)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """The command line: returns its exit code (2 for a problem with the arguments, files or settings)."""
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    specs = [parse_lora_spec(s) for s in args.lora]
    missing = [str(path) for path, _ in specs if not path.is_file()]
    if missing:
        print(f"error: network file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    from library.quiet import quiet_libraries

    quiet_libraries()  # the arguments are good: now load the model libraries, without their banners
    from library.models.loading import load_model
    from library.models.saving import model_format, save_model
    from library.training.device import SAVE_DTYPES

    single_file = model_format(out) == "single_file"
    precision = args.precision or ("fp16" if single_file else "fp32")
    parts = load_model(args.base, config_dir=args.config_dir)
    for line in merge_files(parts, specs):
        print(line)
    save_model(parts, out, SAVE_DTYPES[precision])
    print(f"Wrote {out} ({'single file' if single_file else 'diffusers folder'}, {precision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
