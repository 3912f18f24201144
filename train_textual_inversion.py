#!/usr/bin/env python
"""Train a textual-inversion embedding (new token vectors only; the model never changes) from a TOML config.

    python train_textual_inversion.py configs/quickstart_ti.toml [section.key=value ...] [--check] [--print-config]

The result is an A1111 .pt (or .safetensors) embedding that A1111, ComfyUI and diffusers load; A1111's log
folder (embedding copies, preview images, loss CSV) is written under logging.log_dir.
"""
from __future__ import annotations

import sys

from library.quiet import quiet_libraries

quiet_libraries()  # before the imports below pull in diffusers and transformers

from library.recipes.ti_config import TIRunConfig  # noqa: E402
from library.networks.embeddings import EmbeddingError, expand_name  # noqa: E402
from library.models.loading import load_model  # noqa: E402
from library.recipes.run import fail, prepare_run  # noqa: E402
from library.sampling.preview import with_sampling  # noqa: E402
from library.recipes.ti_training import prepare_embedding_training  # noqa: E402
from library.training.trainer import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    run = prepare_run(argv, TIRunConfig, __doc__.splitlines()[0])
    if run is None:
        return 0
    config = run.config
    v_param = None if config.model.v_parameterization == "auto" else config.model.v_parameterization
    parts = load_model(config.model.path, v_param, config.model.config_dir or None)
    try:
        setup = prepare_embedding_training(config, parts, run.data, run.plan)
    except (EmbeddingError, ValueError) as err:
        fail(str(err))
    if setup is None:
        return 0
    print(setup.describe())
    emb = config.embedding
    hooks = with_sampling(setup.hooks, config, parts, lambda text: expand_name(text, emb.name, emb.vectors))
    Trainer(config, parts, setup.trainable, setup.data, setup.plan, hooks).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
