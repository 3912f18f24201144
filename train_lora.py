#!/usr/bin/env python
"""Train a LoRA (or LoCon) network for Stable Diffusion 1.x/2.x from a TOML config.

    python train_lora.py configs/quickstart_lora.toml [section.key=value ...] [--check] [--print-config]

The result is a kohya-layout .safetensors file that A1111, ComfyUI and diffusers load.
"""
from __future__ import annotations

import sys

from library.quiet import quiet_libraries

quiet_libraries()  # before the imports below pull in peft, diffusers and transformers

from library.config.schema import LoraRunConfig  # noqa: E402
from library.networks.trainable import LoraTrainable, lora_metadata  # noqa: E402
from library.models.loading import load_model  # noqa: E402
from library.recipes.run import fail, prepare_run  # noqa: E402
from library.sampling.preview import with_sampling  # noqa: E402
from library.training.trainer import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    run = prepare_run(argv, LoraRunConfig, __doc__.splitlines()[0])
    if run is None:
        return 0
    config = run.config
    v_param = None if config.model.v_parameterization == "auto" else config.model.v_parameterization
    parts = load_model(config.model.path, v_param, config.model.config_dir or None)
    try:
        trainable = LoraTrainable(parts, config, lora_metadata(config, parts, run.scan, run.plan))
    except ValueError as err:  # e.g. network.init_weights of another rank
        fail(str(err))
    print(trainable.describe())
    Trainer(config, parts, trainable, run.data, run.plan, with_sampling(None, config, parts)).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
