"""run_recipe: what every training script does — parse → validate → resolve → load model → build → train.

Everything before the model loads runs first, so a bad config or dataset fails in a second with every problem
listed. Arguments are parsed before any heavy library is imported, so --help answers at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from library.training.launch import launch_info

if TYPE_CHECKING:
    from library.config.loading import RawConfig
    from library.config.schema import RunConfig
    from library.models.header import ModelHeader
    from library.models.parts import ModelParts
    from library.recipes.base import Recipe
    from library.training.resolved import ResolvedRun


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="TOML config file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.max_steps=200 save.name=test")
    parser.add_argument("--check", action="store_true",
                        help="run every check that needs no weights, print the model, dataset summary and plan, then exit")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config as TOML and exit")
    parser.add_argument("--origins", action="store_true",
                        help="with --print-config: show after each value the file:line that set it (the config or "
                             "a base file it builds on), 'command-line override' or 'default'")
    parser.add_argument("--suggest-repeats", type=int, metavar="STEPS",
                        help="like --check, and suggest per-folder repeats that make train.epochs epochs take "
                             "STEPS steps")
    args = parser.parse_intermixed_args(argv)  # options may come before or after the overrides
    if args.origins and not args.print_config:
        parser.error("--origins goes with --print-config")
    if args.suggest_repeats is not None:
        if args.suggest_repeats < 1:
            parser.error("--suggest-repeats needs a positive number of steps")
        args.check = True
    return args


def fail(message: str, code: int = 2) -> NoReturn:
    if launch_info().is_main:  # the other processes of a data-parallel run meet the same problem: said once
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def read_config_and_origins(path: str | Path | None, overrides: list[str],
                            recipe: "Recipe") -> tuple["RunConfig", "RawConfig"]:
    """The validated config (its paths resolved) and the raw data that says where each value came from;
    ConfigError listing every schema and environment problem."""
    from library.config.loading import read_raw_config, validate_raw
    from library.recipes.checks import environment_problems

    raw = read_raw_config(path, overrides)
    config = validate_raw(raw, recipe.config_class,
                          environment=lambda data, folder_of: environment_problems(data, folder_of, recipe))
    return config, raw


def read_config(path: str | Path | None, overrides: list[str], recipe: "Recipe") -> "RunConfig":
    """The validated config, its paths resolved; ConfigError listing every schema and environment problem."""
    return read_config_and_origins(path, overrides, recipe)[0]


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


def run_problems(config: "RunConfig", recipe: "Recipe", check_only: bool) -> tuple[list[str], "ModelHeader | None"]:
    """What the run cannot do on this machine, with this model or these outputs, found before anything loads;
    and the model's header (family and widths), when it could be read."""
    from library.models.attention import xformers_problem
    from library.models.header import read_model_header
    from library.models.paths import ModelLoadError
    from library.recipes.checks import folder_problem
    from library.registry import OptimizerError
    from library.training.device import resolve_device, runtime_problems
    from library.training.launch import launch_problems
    from library.training.optimizers import check_optimizer

    train, opt = config.train, config.optimizer
    problems = runtime_problems(train.device, train.mixed_precision)
    coupled = bool(train.noise_offset and train.adaptive_noise_scale and train.multires_noise_iterations)
    problems += launch_problems(train.batch_size, train.device, fused_backward_pass=opt.fused_backward_pass,
                                batch_coupled_noise=coupled)
    if train.attention == "xformers" and (why := xformers_problem(resolve_device(train.device))):
        problems.append(f"train.attention = 'xformers' but {why}; use 'auto' (falls back to SDPA) or 'sdpa'")
    folders = [(config.save.output_dir, "save.output_dir"), (config.logging.log_dir, "logging.log_dir")]
    problems += [p for folder, key in folders if (p := folder_problem(folder, key))]
    problems += [] if check_only else output_problems(config)
    try:
        check_optimizer(opt.name, opt.lr, opt.args, recipe.optimizer_lrs(config))
    except OptimizerError as err:
        problems.append(f"optimizer: {err}")
    try:
        header = read_model_header(config.model.path, config.model.config_dir or None)
    except ModelLoadError as err:
        return problems + [f"model.path: {err}"], None
    return problems + recipe.model_problems(config, header), header


def print_summary(run: "ResolvedRun", suggest_steps: int | None = None) -> None:
    from library.training.plan import suggest_repeats

    print("dataset:")
    for line in run.scan.summary_lines() + run.notes:
        print(f"  {line}")
    print("plan:")
    for line in run.plan.lines():
        print(f"  {line}")
    if suggest_steps is not None:
        config = run.config
        try:
            lines = suggest_repeats(run.plan, suggest_steps, config.train.epochs, run.scan.num_reg_samples(),
                                    config.dataset.enable_buckets)
        except ValueError as err:
            fail(str(err))
        print("\n".join(lines))


class ModelLoader:
    """Loads the config's base model once, when first asked (DreamBooth's class images, then training), each
    part straight into the dtype the run keeps it in, with the same one-line error in every script when it
    cannot be loaded."""

    def __init__(self, config: "RunConfig", recipe: "Recipe"):
        self.config = config
        self.recipe = recipe
        self.parts: "ModelParts | None" = None

    def __call__(self) -> "ModelParts":
        from library.models.loading import load_model
        from library.models.paths import ModelLoadError
        from library.recipes.resolve import part_dtypes

        if self.parts is None:
            model = self.config.model
            v_param = None if model.v_parameterization == "auto" else model.v_parameterization
            dtypes = part_dtypes(self.config, self.recipe)
            try:
                self.parts = load_model(model.path, v_param, model.config_dir or None, dtypes)
            except ModelLoadError as err:
                fail(str(err))
            print(f"loaded as: {dtypes.line(self.parts.vae.config)}")
        return self.parts


def prepare(recipe: "Recipe", args: argparse.Namespace) -> tuple["ResolvedRun", ModelLoader] | None:
    """Validate, check and resolve; print the summary. None when --check/--print-config asked to stop here."""
    from library.config.loading import ConfigError, config_to_toml
    from library.config.origins import annotated_toml
    from library.data.errors import DatasetError
    from library.recipes.disk_checks import disk_checks
    from library.recipes.resolve import resolve

    try:
        config, raw = read_config_and_origins(args.config, args.overrides, recipe)
    except ConfigError as err:
        fail(str(err))
    if args.print_config:
        print(annotated_toml(config, raw) if args.origins else config_to_toml(config), end="")
        return None
    if args.suggest_repeats is not None and config.train.epochs is None:
        fail("--suggest-repeats plans repeats for a number of epochs, but the config sets train.max_steps (the "
             "length whatever the repeats): add train.epochs=N to the command")
    problems, header = run_problems(config, recipe, args.check)
    if problems:
        fail(str(ConfigError(args.config, problems)))
    print(header.line())
    for line in recipe.model_lines(config, header):
        print(line)
    load = ModelLoader(config, recipe)
    if not args.check:
        _join_processes(config)
        _tune_host_allocator(config)
    recipe.before_scan(config, args.check, load)
    try:
        run = resolve(config, recipe)
    except (DatasetError, ValueError) as err:
        fail(str(err))
    print_summary(run, args.suggest_repeats)
    disk_lines, disk_problems = disk_checks(run, recipe, header)
    print("disk:\n" + "\n".join(f"  {line}" for line in disk_lines))
    if disk_problems:
        fail(str(ConfigError(args.config, disk_problems)))
    if args.check:
        print("config and dataset OK (--check: not training)")
        return None
    return run, load


def run_recipe(recipe: "Recipe", argv: list[str] | None, description: str) -> int:
    """A training script's whole main: returns the exit code. Expected problems print one line (or one list)
    and exit with code 2 (SystemExit); anything else is a bug and says so (library/cli.py)."""
    from library.cli import run_main
    from library.host_memory import request_huge_pages

    request_huge_pages()  # before anything imports torch, which reads the setting once
    return run_main(lambda args: _run(recipe, args, description), argv)


def _join_processes(config: "RunConfig") -> None:
    """With several processes (accelerate launch), join their process group before anything loads."""
    if launch_info().processes > 1:
        from library.training.distributed import start_processes

        start_processes(config.train.device)


def _tune_host_allocator(config: "RunConfig") -> None:
    """Before the model loads, so its weights are placed under the same allocator settings as the steps."""
    from library.host_memory import tune_host_allocator
    from library.training.device import resolve_device

    if line := tune_host_allocator(resolve_device(config.train.device).type):
        print(line)


def _run(recipe: "Recipe", argv: list[str] | None, description: str) -> int:
    from library.errors import UserError
    from library.training.launch import quiet_unless_main

    args = parse_args(argv, description)
    quiet_unless_main(launch_info())  # after parsing: --help and usage errors print in every process
    try:
        return _train_run(recipe, args, argv)
    except UserError as err:
        if launch_info().is_main:
            raise
        # the main process says what went wrong when the same happens to it; a problem of this process alone
        # (its own files, its GPU) must still be seen: one line on the real stderr, naming the process
        print(f"error (process {launch_info().rank}): {err}".splitlines()[0], file=sys.__stderr__, flush=True)
        raise SystemExit(2) from None


def _train_run(recipe: "Recipe", args: argparse.Namespace, argv: list[str] | None) -> int:
    prepared = prepare(recipe, args)
    if prepared is None:
        return 0
    run, load = prepared
    import dataclasses

    from library.quiet import quiet_libraries

    run = dataclasses.replace(run, command=launch_command(recipe, argv))

    quiet_libraries()  # before the imports that pull in peft, diffusers and transformers
    if run.config.train.num_threads:
        import torch

        torch.set_num_threads(run.config.train.num_threads)
    return train(recipe, run, load())


def launch_command(recipe: "Recipe", argv: list[str] | None) -> tuple[str, ...]:
    """The command line as it can be typed again from here: this Python (or accelerate launch), the script and
    its arguments."""
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    script = sys.argv[0] if argv is None and sys.argv[0].endswith(".py") else recipe.script
    python = sys.executable or "python"
    try:
        relative = os.path.relpath(python)
        python = python if relative.startswith("..") else relative
    except ValueError:  # another drive on Windows
        pass
    processes = launch_info().processes
    if processes > 1:  # started by accelerate launch (torchrun): continued the same way, on as many processes
        return ("accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), script, *args)
    return (python, script, *args)


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
    from library.training.distributed import end_processes
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
    end_processes()
    return 0
