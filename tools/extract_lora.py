"""Extract a LoRA from a fine-tuned model (e.g. a DreamBooth result): the difference to its base model,
reduced by SVD to the chosen rank and saved in the kohya layout A1111, ComfyUI and diffusers load.

    python tools/extract_lora.py TUNED BASE OUT.safetensors --rank 32 [--conv-rank 16] [--clamp-quantile 0.99]

TUNED and BASE: builtin:tiny-sd15, a diffusers folder, a .safetensors/.ckpt file or a locally cached hub id.
The LoRA applies at weight 1 (alpha = rank). A text encoder left unchanged by the fine-tune is left out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# tools/ is a subfolder: make `library` importable when run as `python tools/extract_lora.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402

PRECISIONS = ("fp16", "bf16", "fp32")


def _quantile(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]; sd-scripts uses 0.99")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tuned", help="the fine-tuned model")
    parser.add_argument("base", help="the model the fine-tune started from")
    parser.add_argument("out", help="output LoRA file (.safetensors)")
    parser.add_argument("--rank", type=int, required=True, help="rank of attention/linear modules (network dim)")
    parser.add_argument("--conv-rank", type=int, default=0,
                        help="rank of ResNet 3x3 convolutions (LoCon); 0 = leave them out (default)")
    parser.add_argument("--clamp-quantile", type=_quantile, default=None,
                        help="clamp factor outliers at this quantile, as sd-scripts does with 0.99 (default: off)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="tensor precision to write")
    parser.add_argument("--device", default="auto", help="where the SVDs run: auto (cuda if available), cpu, cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    args = parser.parse_args(argv)
    if args.rank < 1 or args.conv_rank < 0:
        parser.error("--rank must be at least 1 and --conv-rank at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line: returns its exit code (2 for a problem with the arguments, files or settings)."""
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        print(f"error: {out}: LoRA files are written as .safetensors; give OUT that extension", file=sys.stderr)
        return 2
    if out.exists() and not args.overwrite:
        print(f"error: {out} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    from library.quiet import quiet_libraries

    quiet_libraries()  # the arguments are good: now load the model libraries, without their banners
    from library.models.loading import load_model
    from library.networks.extract import ExtractSettings, extract_lora, extract_metadata
    from library.training.checkpoints import atomic_save_safetensors
    from library.training.device import SAVE_DTYPES, resolve_device

    tuned, base = load_model(args.tuned), load_model(args.base)
    settings = ExtractSettings(args.rank, args.conv_rank, args.clamp_quantile)
    tensors, changed = extract_lora(tuned, base, settings, resolve_device(args.device), SAVE_DTYPES[args.precision])
    if not tensors:
        print(f"error: {args.tuned} and {args.base} have the same weights: there is nothing to extract",
              file=sys.stderr)
        return 2
    atomic_save_safetensors(tensors, out, extract_metadata(tuned, base, settings, changed))
    modules = sum(1 for k in tensors if k.endswith(".alpha"))
    print(f"Wrote {out}: {modules} modules ({', '.join(changed)}), rank {args.rank}"
          + (f", conv rank {args.conv_rank}" if args.conv_rank else "") + f", {args.precision}; apply at weight 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
