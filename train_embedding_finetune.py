#!/usr/bin/env python
"""Fine-tune existing token embeddings (chosen words' rows of the text encoder's token table, or all of them).

    python train_embedding_finetune.py configs/quickstart_embedding_finetune.toml [section.key=value ...] [--check]

Unlike textual inversion no token is added: the rows of words the captions already use are trained on those
captions, and only those rows change. The result is a small .safetensors of the changed rows that
tools/merge_lora.py applies to a model (optionally also written as a whole model).
"""
from __future__ import annotations

import sys

from library.recipes.embedding_finetune import RECIPE
from library.recipes.run import run_recipe


def main(argv: list[str] | None = None) -> int:
    return run_recipe(RECIPE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
