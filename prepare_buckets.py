#!/usr/bin/env python
"""Print a config's aspect-ratio buckets and encode its latents into the disk cache, ahead of training.

    python prepare_buckets.py CONFIG [section.key=value ...] [--no-cache] [--workers N] [--device auto|cpu|cuda]

Reads the same TOML as the trainers (it needs only [model] and [dataset]; other sections are left to the
trainer). Latents go to dataset.cache_dir (default <train_dir>/.kiln-cache), keyed on each image's content,
size, crop, flip, the VAE and its precision (the config's train.mixed_precision, as its trainer encodes), so a
later run with dataset.cache_latents = "disk" never runs the VAE on them.
Interrupted, it keeps what it wrote: run it again to continue. Run it again after editing images or bucket
settings and only what changed is encoded.
"""
from __future__ import annotations

import argparse
import sys
from typing import Literal

from pydantic import ConfigDict

from library.cli import run_main
from library.config.loading import read_raw_config, validate_raw
from library.config.schema import DatasetSection, ModelSection, Section


class PrepareTrainSection(Section):
    """Of [train], what decides the precision the VAE encodes in."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


class PrepareConfig(Section):
    """The sections this script needs; any trainer's other sections are accepted and not checked here."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)
    model: ModelSection
    dataset: DatasetSection
    train: PrepareTrainSection = PrepareTrainSection()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the training TOML config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    parser.add_argument("--no-cache", action="store_true", help="print the bucket table only; encode nothing")
    parser.add_argument("--workers", type=int, default=0, help="image decoding threads (default: up to 8)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="where the VAE runs (auto: CUDA when available)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: returns its exit code (2 for a problem with the arguments, files or settings)."""
    return run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    # imported once the arguments parse: --help answers without loading torch
    from library.data.buckets import assign_buckets, square_assignment, upscale_warning
    from library.data.folders import balance_reg_items
    from library.config.trainers import infer_trainer
    from library.data.latent_cache import DiskLatentCache, LatentEntry
    from library.recipes.checks import environment_problems
    from library.recipes.resolve import bucket_settings, latent_cache_dir, scan_dataset

    raw = read_raw_config(args.config, args.overrides)
    config = validate_raw(raw, PrepareConfig, environment=environment_problems)
    ds = config.dataset
    scan = scan_dataset(ds)
    items = scan.train_items + balance_reg_items(scan.num_train_samples(), scan.reg_items)
    if ds.enable_buckets:
        buckets = assign_buckets(items, bucket_settings(ds))
    else:
        buckets = square_assignment(items, ds.resolution)
    print("\n".join(scan.summary_lines() + buckets.table_lines(items) + upscale_warning(items, buckets)))
    if args.no_cache:
        return 0
    if ds.random_crop:
        print("dataset.random_crop = true draws a new crop every step, so its latents cannot be cached: nothing "
              "to encode")
        return 0
    flips = (False, True) if ds.flip_aug else (False,)
    entries = [LatentEntry(item.path, w, h, flip) for item, (w, h) in zip(items, buckets.sizes) for flip in flips]
    folder = latent_cache_dir(ds)
    vae = load_vae(config, args.device, infer_trainer(raw.data))
    cache = DiskLatentCache(folder, vae)
    print(f"caching {len(entries)} latents ({len(items)} images{' and their mirror images' if ds.flip_aug else ''}) "
          f"in {folder}")
    try:
        report, _ = cache.ensure(entries, ds.vae_batch_size, args.workers)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the latents written so far are kept in {folder}; run the same command again to "
              "continue")
        return 130
    print(report.summary(folder))
    if ds.cache_latents != "disk":
        print(f'note: this config has dataset.cache_latents = "{ds.cache_latents}"; set it to "disk" for training '
              "to use this cache")
    return 0


def load_vae(config: PrepareConfig, device: str, trainer: str):
    """The config's VAE in the precision its trainer encodes in (train.mixed_precision where that is safe), on
    `device`; the other parts load in the run's precision too (less memory)."""
    import importlib

    import torch

    from library.config.trainers import TRAINER_SCRIPTS
    from library.models.dtypes import PartDtypes
    from library.models.loading import load_model
    from library.quiet import quiet_libraries
    from library.training.device import WEIGHT_DTYPES

    quiet_libraries()

    # as recipes/resolve.py part_dtypes decides the VAE's dtype (the trainer's recipe, unknown names as LoRA)
    recipe = importlib.import_module(f"library.recipes.{trainer}").RECIPE if trainer in TRAINER_SCRIPTS else None
    saves_vae = recipe is not None and recipe.saves_base_model
    dtypes = PartDtypes.for_run(WEIGHT_DTYPES[config.train.mixed_precision], {"vae"} if saves_vae else ())
    v_param = None if config.model.v_parameterization == "auto" else config.model.v_parameterization
    parts = load_model(config.model.path, v_param, config.model.config_dir or None, dtypes)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.nn.Module.to(parts.vae, device).eval().requires_grad_(False)


if __name__ == "__main__":
    sys.exit(main())
