#!/usr/bin/env python
"""Train an A1111 hypernetwork (small MLPs that rewrite the attention keys and values; the model never changes).

    python train_hypernetwork.py configs/quickstart_hypernetwork.toml [section.key=value ...] [--check] [--print-config]

The result is A1111's hypernetwork .pt (models/hypernetworks/ in A1111, <hypernet:name:1> in a prompt; ComfyUI's
HypernetworkLoader reads it too); A1111's log folder (hypernetwork copies with their .optim, preview images,
hypernetwork_loss.csv) is written under logging.log_dir.
"""
from __future__ import annotations

import sys

from library.recipes.hypernetwork import RECIPE
from library.recipes.run import run_recipe


def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
