"""What every training script does before it trains: arguments → config → dataset scan → plan → summary.

All of it runs before any model loads, so a bad config or dataset fails in a second with every problem listed.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from library.data.buckets import assign_buckets, bucket_settings, ignored_bucket_keys
from library.training.checkpoints import existing_outputs
from library.config.schema import ConfigError, RunConfig, config_to_toml, load_config
from library.data.folders import (CaptionOptions, DatasetError, DatasetScan, Subset, balance_reg_items,
                             reg_balance_message, scan_subsets, subsets_from_folder)
from library.data.latent_cache import cache_dir_for
from library.training.optimizers import OptimizerError, check_optimizer
from library.training.plan import TrainingPlan, make_plan
from library.training.schedules import resolve_warmup_steps
from library.training.trainer import runtime_problems
from library.data.sources import TrainingData, text_encoder_cache_problem


@dataclass
class PreparedRun:
    config: RunConfig
    scan: DatasetScan
    data: TrainingData
    plan: TrainingPlan


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="TOML config file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.max_steps=200 save.name=test")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print it and the dataset summary, then exit without training")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config as TOML and exit")
    return parser.parse_intermixed_args(argv)  # options may come before or after the overrides


def config_subsets(config: RunConfig) -> list[Subset]:
    ds = config.dataset
    subsets = []
    if ds.train_dir:
        subsets += subsets_from_folder(Path(ds.train_dir), False, ds.caption_extension)
    if ds.reg_dir:
        subsets += subsets_from_folder(Path(ds.reg_dir), True, ds.caption_extension)
    for s in ds.subsets:
        subsets.append(Subset(Path(s.image_dir), s.repeats, s.class_tokens, s.is_reg,
                              s.caption_extension or ds.caption_extension))
    return subsets


def scan_dataset(config: RunConfig) -> DatasetScan:
    """Scan folders and images; bad images stop the run unless dataset.skip_bad_images is set."""
    scan = scan_subsets(config_subsets(config))
    if scan.bad_images and not config.dataset.skip_bad_images:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in scan.bad_images)
        raise DatasetError(f"{len(scan.bad_images)} image(s) cannot be read:\n{listed}\n"
                           "fix or remove them, or set dataset.skip_bad_images = true to train without them")
    if not scan.train_items:
        raise DatasetError("no readable training images were found (only regularisation images)")
    return scan


def build_data(config: RunConfig, scan: DatasetScan) -> tuple[TrainingData, TrainingPlan, list[str]]:
    """Training items (with reg repeats balanced as sd-scripts does), buckets, batching and the step plan.
    The notes hold the reg-balance line and, with buckets, the bucket table."""
    ds, train = config.dataset, config.train
    train_samples = scan.num_train_samples()
    notes = []
    reg = scan.reg_items
    if reg:
        message = reg_balance_message(train_samples, reg)
        if message:
            notes.append(message)
        reg = balance_reg_items(train_samples, reg)
    items = scan.train_items + reg
    if problem := text_encoder_cache_problem(config):
        raise ValueError(problem)
    sizes = None
    if ds.enable_buckets:
        buckets = assign_buckets(items, bucket_settings(ds))
        sizes = buckets.sizes
        notes.extend(buckets.table_lines(items))
    elif ignored := ignored_bucket_keys(ds):
        notes.append(f"{', '.join(ignored)} have no effect while dataset.enable_buckets = false")
    cache_dir = cache_dir_for(ds) if ds.cache_latents == "disk" else None
    if cache_dir is not None:
        notes.append(f"latent cache: {cache_dir} (dataset.cache_latents = \"disk\")")
    captions = CaptionOptions(ds.caption_prefix, ds.caption_suffix, ds.shuffle_caption, ds.keep_tokens,
                              ds.caption_dropout_rate, ds.caption_tag_dropout_rate)
    data = TrainingData(items, captions, ds.resolution, train.batch_size, train.seed, ds.flip_aug, ds.random_crop,
                        sizes, cache_dir, ds.vae_batch_size)
    plan = make_plan(train_samples, sum(i.repeats for i in reg), train.batch_size, len(data.epoch_batches(0)),
                     train.gradient_accumulation_steps, train.max_steps, train.epochs)
    resolve_warmup_steps(plan.total_steps, config.optimizer.warmup_steps, config.optimizer.warmup_ratio)
    if cache_dir is not None:
        check_writable(cache_dir, "dataset.cache_dir")
    return data, plan, notes


def check_writable(folder: Path, key: str) -> None:
    """Fail now, not after the model loaded, when an output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".kiln-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{key}: cannot write to {folder} ({err.strerror or err}); choose another folder") from None


def output_problems(config: RunConfig, suffix_note: str = "") -> list[str]:
    """Refuse to overwrite an earlier run's files unless asked."""
    save = config.save
    if save.overwrite or save.resume:
        return []
    found = existing_outputs(Path(save.output_dir), save.name)
    if not found:
        return []
    names = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "")
    return [f"save: {save.output_dir} already holds output of a run named '{save.name}' ({names}); "
            f"choose another save.name, set save.overwrite = true, or resume with save.resume"]


def print_summary(scan: DatasetScan, plan: TrainingPlan, notes: list[str]) -> None:
    print("dataset:")
    for line in scan.summary_lines() + notes:
        print(f"  {line}")
    print("plan:")
    for line in plan.lines():
        print(f"  {line}")


def fail(message: str, code: int = 2) -> "NoReturn":  # noqa: F821
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def prepare_run(argv: list[str] | None, config_model: type[RunConfig], description: str) -> PreparedRun | None:
    """Parse, validate and scan; print the summary. Returns None when --check/--print-config asked to stop."""
    args = parse_args(argv, description)
    try:
        config = load_config(args.config, args.overrides, config_model)
    except ConfigError as err:
        fail(str(err))
    if args.print_config:
        print(config_to_toml(config), end="")
        return None
    problems = runtime_problems(config.train) + ([] if args.check else output_problems(config))
    try:
        check_optimizer(config.optimizer.name, config.optimizer.lr, config.optimizer.args)
    except OptimizerError as err:
        problems.append(f"optimizer: {err}")
    if problems:
        fail(str(ConfigError(args.config, problems)))
    try:
        scan = scan_dataset(config)
        data, plan, notes = build_data(config, scan)
    except (DatasetError, ValueError) as err:
        fail(str(err))
    if args.check:
        print(config_to_toml(config))
    print_summary(scan, plan, notes)
    if args.check:
        print("config and dataset OK (--check: not training)")
        return None
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    return PreparedRun(config, scan, data, plan)
