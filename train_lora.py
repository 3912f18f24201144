#!/usr/bin/env python
"""Train a LoRA (or LoCon) network for Stable Diffusion from a TOML config.

    python train_lora.py configs/quickstart_lora.toml [section.key=value ...] [--check] [--print-config]

The result is a kohya-layout .safetensors file that A1111, ComfyUI and diffusers load.
"""
from __future__ import annotations

import sys

from library.recipes.lora import RECIPE
from library.recipes.run import run_recipe


def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
