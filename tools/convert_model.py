"""Convert a Stable Diffusion model between single-file (.safetensors) and diffusers-folder formats.

    python tools/convert_model.py SRC DST [--precision fp16|bf16|fp32] [--overwrite]

SRC: builtin:tiny-sd15, a diffusers folder, a .safetensors/.ckpt file or a locally cached hub id.
DST ending in .safetensors → original SD single file (what A1111/ComfyUI load); anything else → diffusers folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# tools/ is a subfolder: make `library` importable when run as `python tools/convert_model.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cli import run_main  # noqa: E402

PRECISIONS = ("fp16", "bf16", "fp32")
V_CHOICES = {"auto": None, "true": True, "false": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="model to read")
    parser.add_argument("dst", help="output .safetensors file or diffusers folder")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="weight precision to write (default: fp16 for .safetensors, fp32 for folders)")
    parser.add_argument("--v-parameterization", choices=sorted(V_CHOICES), default="auto",
                        help="prediction type to record: true = v-prediction (SD2 768-v), default auto-detect")
    parser.add_argument("--config-dir", help="diffusers folder whose configs describe a single-file SRC")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it already exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: returns its exit code (2 for a problem with the arguments, files or settings)."""
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    dst = Path(args.dst)
    single_file = dst.suffix.lower() == ".safetensors"
    if dst.exists() and not args.overwrite:
        print(f"error: {dst} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    precision = args.precision or ("fp16" if single_file else "fp32")
    from library.quiet import quiet_libraries

    quiet_libraries()  # the arguments are good: now load the model libraries, without their banners
    from library.models.loading import load_model
    from library.models.saving import save_model
    from library.training.device import SAVE_DTYPES

    parts = load_model(args.src, V_CHOICES[args.v_parameterization], args.config_dir)
    save_model(parts, dst, SAVE_DTYPES[precision])
    print(f"Wrote {dst} ({'single file' if single_file else 'diffusers folder'}, {precision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
