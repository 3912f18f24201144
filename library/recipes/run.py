"""run_recipe: what every training script does — parse → validate → resolve → load model → build → train.

Everything before the model loads runs first, so a bad config or dataset fails in a second with every problem
listed. Arguments are parsed before any heavy library is imported, so --help answers at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from library.config.schema import RunConfig
    from library.models.parts import ModelParts
    from library.recipes.base import Recipe
    from library.training.resolved import ResolvedRun


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="TOML config file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.max_steps=200 save.name=test")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print it and the dataset summary, then exit without training")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config as TOML and exit")
    return parser.parse_intermixed_args(argv)  # options may come before or after the overrides


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def read_config(path: str | Path | None, overrides: list[str], recipe: "Recipe") -> "RunConfig":
    """The validated config, its paths resolved; ConfigError listing every schema and environment problem."""
    from library.config.loading import load_config
    from library.recipes.checks import environment_problems

    return load_config(path, overrides, recipe.config_class,
                       environment=lambda data, base: environment_problems(data, base, recipe))


def output_problems(config: "RunConfig") -> list[str]:
    """Refuse to overwrite an earlier run's files unless asked."""
    from library.training.checkpoints import existing_outputs

    save = config.save
    if save.overwrite or save.resume:
        return []
    found = existing_outputs(Path(save.output_dir), save.name)
    if not found:
        return []
    names = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "")
    return [f"save: {save.output_dir} already holds output of a run named '{save.name}' ({names}); "
            f"choose another save.name, set save.overwrite = true, or resume with save.resume"]


def run_problems(config: "RunConfig", check_only: bool) -> list[str]:
    """What the run cannot do on this machine or with these outputs, before anything loads."""
    from library.training.device import runtime_problems
    from library.training.optimizers import OptimizerError, check_optimizer

    problems = runtime_problems(config.train.device, config.train.mixed_precision)
    problems += [] if check_only else output_problems(config)
    try:
        check_optimizer(config.optimizer.name, config.optimizer.lr, config.optimizer.args)
    except OptimizerError as err:
        problems.append(f"optimizer: {err}")
    return problems


def print_summary(run: "ResolvedRun") -> None:
    print("dataset:")
    for line in run.scan.summary_lines() + run.notes:
        print(f"  {line}")
    print("plan:")
    for line in run.plan.lines():
        print(f"  {line}")


class ModelLoader:
    """Loads the config's base model once, when first asked (DreamBooth's class images, then training), with
    the same one-line error in every script when it cannot be loaded."""

    def __init__(self, config: "RunConfig"):
        self.config = config
        self.parts: "ModelParts | None" = None

    def __call__(self) -> "ModelParts":
        from library.models.loading import load_model
        from library.models.paths import ModelLoadError

        if self.parts is None:
            model = self.config.model
            v_param = None if model.v_parameterization == "auto" else model.v_parameterization
            try:
                self.parts = load_model(model.path, v_param, model.config_dir or None)
            except ModelLoadError as err:
                fail(str(err))
        return self.parts


def prepare(recipe: "Recipe", args: argparse.Namespace) -> tuple["ResolvedRun", ModelLoader] | None:
    """Validate, check and resolve; print the summary. None when --check/--print-config asked to stop here."""
    from library.config.loading import ConfigError, config_to_toml
    from library.data.errors import DatasetError
    from library.recipes.resolve import resolve

    try:
        config = read_config(args.config, args.overrides, recipe)
    except ConfigError as err:
        fail(str(err))
    if args.print_config:
        print(config_to_toml(config), end="")
        return None
    if problems := run_problems(config, args.check):
        fail(str(ConfigError(args.config, problems)))
    load = ModelLoader(config)
    recipe.before_scan(config, args.check, load)
    try:
        run = resolve(config, recipe)
    except (DatasetError, ValueError) as err:
        fail(str(err))
    if args.check:
        print(config_to_toml(config))
    print_summary(run)
    if args.check:
        print("config and dataset OK (--check: not training)")
        return None
    return run, load


def run_recipe(recipe: "Recipe", argv: list[str] | None, description: str) -> int:
    """A training script's whole main: returns the exit code (SystemExit with a one-line error on problems)."""
    args = parse_args(argv, description)
    from library.quiet import quiet_libraries

    quiet_libraries()  # before the imports below pull in peft, diffusers and transformers
    prepared = prepare(recipe, args)
    if prepared is None:
        return 0
    run, load = prepared
    if run.config.train.num_threads:
        import torch

        torch.set_num_threads(run.config.train.num_threads)
    return train(recipe, run, load())


def resolution_note(resolution: int, parts: "ModelParts") -> str | None:
    """A note when a released model trains well below the size it was made for (SDXL: 1024)."""
    from library.models.paths import BUILTIN_PREFIX

    native = parts.family.native_resolution(parts.v_prediction)
    if parts.source.startswith(BUILTIN_PREFIX) or resolution * 4 > native * 3:
        return None
    return (f"note: {parts.family.label} models were trained at {native}x{native}; dataset.resolution = {resolution} "
            f"trains this one at {resolution * resolution / native ** 2:.0%} of those pixels (set dataset.resolution = "
            f"{native} unless that is what you want)")


def train(recipe: "Recipe", run: "ResolvedRun", parts: "ModelParts") -> int:
    """Build what the recipe trains on the loaded model, then run the shared loop."""
    import dataclasses

    from library.sampling.preview import with_sampling
    from library.training.trainer import Trainer

    if note := resolution_note(run.config.dataset.resolution, parts):
        print(note)
    try:
        built = recipe.build(parts, run)
    except ValueError as err:  # a problem only the loaded model shows, e.g. an init file of another rank
        fail(str(err))
    if built is None:
        return 0
    for line in built.lines:
        print(line)
    if built.data is not None:
        run = dataclasses.replace(run, data=built.data)
    hooks = with_sampling(built.hooks, run.config, parts, built.prompt_transform)
    Trainer(run, parts, built.trainable, hooks, built.start).train()
    return 0
