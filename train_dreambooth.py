#!/usr/bin/env python
"""DreamBooth: fine-tune a whole Stable Diffusion model on your images, with prior preservation.

    python train_dreambooth.py configs/quickstart_dreambooth.toml [section.key=value ...] [--check] [--print-config]

The result is a full model: a single .safetensors checkpoint (A1111, ComfyUI) or a diffusers folder.
Missing class images (dreambooth.num_class_images) are generated with the base model before training.
"""
from __future__ import annotations

import sys

from library.recipes.dreambooth import RECIPE
from library.recipes.run import run_recipe


def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
