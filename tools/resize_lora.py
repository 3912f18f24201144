"""Reduce a kohya LoRA/LoCon file's rank by SVD, keeping its layout and metadata (sd-scripts' resize_lora.py).

    python tools/resize_lora.py IN.safetensors OUT.safetensors --rank 8 [--conv-rank 4]
    python tools/resize_lora.py IN.safetensors OUT.safetensors --dynamic sv_fro --dynamic-param 0.9 [--rank 32]

Fixed: every module keeps its top --rank singular values (3x3 convolutions --conv-rank, default --rank).
Dynamic: each module keeps what the method asks — sv_ratio X: singular values above the largest / X;
sv_cumulative X: the fewest reaching the fraction X of their sum; sv_fro X: the fewest keeping the fraction X
of the Frobenius norm — capped by --rank / --conv-rank when given. alpha/rank is kept, so the file applies the
best low-rank approximation of what it applied before, at the same weight. Prints each module's retained share.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

# tools/ is a subfolder: make `library` importable when run as `python tools/resize_lora.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.quiet import quiet_libraries  # noqa: E402

quiet_libraries()  # before torch imports print their banners

import torch  # noqa: E402

from library.networks.kinds import kind_of_weights  # noqa: E402
from library.networks.merge import read_network_file  # noqa: E402
from library.networks.resize import DYNAMIC_METHODS, ResizeSettings, resize_lora, resized_metadata  # noqa: E402
from library.training.checkpoints import atomic_save_safetensors  # noqa: E402
from library.training.device import SAVE_DTYPES as PRECISIONS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the LoRA file to resize (.safetensors)")
    parser.add_argument("out", help="the resized LoRA file (.safetensors)")
    parser.add_argument("--rank", type=int, help="the new rank (fixed mode), or the largest rank (dynamic mode)")
    parser.add_argument("--conv-rank", type=int, help="the same for 3x3 convolutions (LoCon); default --rank")
    parser.add_argument("--dynamic", choices=DYNAMIC_METHODS, help="choose each module's rank from its singular values")
    parser.add_argument("--dynamic-param", type=float, help="sv_ratio: a ratio ≥ 1; sv_fro, sv_cumulative: 0–1")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="tensor precision (default: the file's)")
    parser.add_argument("--device", default="auto", help="where the SVDs run: auto (cuda if available), cpu, cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    return parser.parse_args(argv)


def settings_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the resize options, in one line, or None."""
    if args.dynamic is None and args.dynamic_param is not None:
        return "--dynamic-param needs --dynamic sv_ratio|sv_fro|sv_cumulative"
    if args.dynamic is None and args.rank is None:
        return "give --rank N (a fixed rank) or --dynamic METHOD --dynamic-param X"
    if args.dynamic is not None and args.dynamic_param is None:
        return f"--dynamic {args.dynamic} needs --dynamic-param (e.g. {'4' if args.dynamic == 'sv_ratio' else '0.9'})"
    for option, value in (("--rank", args.rank), ("--conv-rank", args.conv_rank)):
        if value is not None and value < 1:
            return f"{option} {value}: a rank is at least 1"
    param = args.dynamic_param
    if args.dynamic == "sv_ratio" and param < 1:
        return f"--dynamic-param {param:g}: sv_ratio keeps singular values above the largest / X, so X ≥ 1"
    if args.dynamic in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        return f"--dynamic-param {param:g}: {args.dynamic} keeps a fraction, so 0 < X ≤ 1"
    return None


def file_problem(args: argparse.Namespace) -> str | None:
    source, out = Path(args.source), Path(args.out)
    if not source.is_file():
        return f"{source} not found"
    if out.suffix.lower() != ".safetensors":
        return f"{out}: LoRA files are written as .safetensors; give OUT that extension"
    if out.exists() and not args.overwrite:
        return f"{out} already exists; pass --overwrite to replace it"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if problem := settings_problem(args) or file_problem(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        weights, metadata = read_network_file(args.source)
        kind = kind_of_weights(weights)
        if kind is not None and kind.name != "lora":
            raise ValueError(f"it is a {kind.name} file; resize_lora.py reduces kohya LoRA/LoCon files")
        settings = ResizeSettings(args.rank, args.conv_rank, args.dynamic, args.dynamic_param or 0.0)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        dtype = PRECISIONS[args.precision] if args.precision else None
        tensors, results = resize_lora(weights, settings, device, dtype)
    except ValueError as err:
        print(f"error: {args.source}: {err}", file=sys.stderr)
        return 1
    if not args.dynamic and all(r.new_rank == r.old_rank for r in results):
        print(f"error: every module of {args.source} already has rank ≤ {args.rank} (conv: "
              f"{args.conv_rank or args.rank}); nothing to reduce", file=sys.stderr)
        return 1
    for result in results:
        print(result.line())
    fro = [r.fro_retained for r in results]
    spread = statistics.pstdev(fro) if len(fro) > 1 else 0.0
    print(f"average Frobenius norm retained: {statistics.fmean(fro):.2%} (std {spread:.3f}) over {len(fro)} modules")
    atomic_save_safetensors(tensors, Path(args.out), resized_metadata(metadata, settings, results))
    ranks = sorted({r.new_rank for r in results})
    print(f"Wrote {args.out}: " + (f"ranks {ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0]}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
