#!/usr/bin/env python
"""Train a textual-inversion embedding (new token vectors only; the model never changes) from a TOML config.

    python train_textual_inversion.py configs/quickstart_ti.toml [section.key=value ...] [--check] [--print-config]

The result is an A1111 .pt (or .safetensors) embedding that A1111, ComfyUI and diffusers load; A1111's log
folder (embedding copies, preview images, loss CSV) is written under logging.log_dir.
"""
from __future__ import annotations

import sys

from library.recipes.textual_inversion import RECIPE
from library.recipes.run import run_recipe


def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
