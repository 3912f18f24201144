#!/usr/bin/env python
"""DreamBooth: fine-tune a whole Stable Diffusion 1.x/2.x model on your images, with prior preservation.

    python train_dreambooth.py configs/quickstart_dreambooth.toml [section.key=value ...] [--check] [--print-config]

The result is a full model: a single .safetensors checkpoint (A1111, ComfyUI) or a diffusers folder.
Missing class images (dreambooth.num_class_images) are generated with the base model before training.
"""
from __future__ import annotations

import sys

from library.quiet import quiet_libraries

quiet_libraries()  # before the imports below pull in diffusers and transformers

import torch  # noqa: E402

from library.recipes.class_images import ClassImageStatus, class_image_status, generate_class_images  # noqa: E402
from library.config.schema import ConfigError, load_config  # noqa: E402
from library.recipes.dreambooth_config import DreamBoothRunConfig  # noqa: E402
from library.recipes.dreambooth import DreamBoothHooks, DreamBoothTrainable  # noqa: E402
from library.models.loading import ModelLoadError, ModelParts, load_model  # noqa: E402
from library.recipes.run import fail, output_problems, parse_args, prepare_run  # noqa: E402
from library.sampling.preview import with_sampling  # noqa: E402
from library.training.trainer import Trainer, runtime_problems  # noqa: E402

DESCRIPTION = __doc__.splitlines()[0]


def _load(config: DreamBoothRunConfig) -> ModelParts:
    v_param = None if config.model.v_parameterization == "auto" else config.model.v_parameterization
    try:
        return load_model(config.model.path, v_param, config.model.config_dir or None)
    except ModelLoadError as err:
        fail(str(err))


def class_images_status(args) -> tuple[DreamBoothRunConfig, ClassImageStatus] | None:
    """The config and its class-image count when dreambooth.num_class_images asks for some, else None."""
    if args.print_config:
        return None
    try:
        config = load_config(args.config, args.overrides, DreamBoothRunConfig)
    except ConfigError as err:
        fail(str(err))
    status = class_image_status(config)
    return None if status is None else (config, status)


def make_class_images(args, config: DreamBoothRunConfig, status: ClassImageStatus) -> ModelParts:
    """Generate the missing class images before the dataset scan, so they join the run; returns the base model
    (training reuses it)."""
    # problems that would stop the run after generating are reported before spending the time on it
    problems = runtime_problems(config.train) + output_problems(config)
    if problems:
        fail(str(ConfigError(args.config, problems)))
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    parts = _load(config)
    written = generate_class_images(parts, config, status)
    print(f"class images: wrote {len(written)} to {status.folder}")
    return parts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, DESCRIPTION)
    found = class_images_status(args)
    parts = None
    if found and not args.check:
        print(found[1].line())
        if found[1].missing:
            parts = make_class_images(args, *found)
    run = prepare_run(argv, DreamBoothRunConfig, DESCRIPTION)
    if run is None:
        if found and args.check:  # after the dataset summary, which does not count them yet
            print(found[1].line())
        return 0
    config = run.config
    parts = parts or _load(config)
    trainable = DreamBoothTrainable(parts, config)
    print(trainable.describe())
    hooks = with_sampling(DreamBoothHooks(trainable), config, parts)
    Trainer(config, parts, trainable, run.data, run.plan, hooks).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
