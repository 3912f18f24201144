"""train_hypernetwork.py's recipe: an A1111 hypernetwork (per context width a key and a value MLP that rewrite
the attention inputs) trained the A1111 way — templates, schedule string, latent sampling methods, log folder,
`.optim` resume — on the frozen model. The `[hypernetwork]` keys are the file's own keys."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from library.config.schema import RunConfig, fill_defaults
from library.data.captions import FILE_NAME
from library.networks.hypernetwork_spec import (HypernetworkSpec, a1111_dropout_structure, default_sizes,
                                                structure_problems)
from library.recipes.a1111_train import (A1111LogKeys, A1111PromptKeys, a1111_plan, prompt_key_problems,
                                         prompt_rule_problems)
from library.recipes.base import Built, PlanChange, Recipe

_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._ -]*$")  # what A1111 keeps of a name: letters, digits, "._- "
STRUCTURE_KEYS = ("layer_structure", "activation_func", "is_layer_norm", "use_dropout", "dropout_structure",
                  "activate_output")


class HypernetworkSection(A1111PromptKeys):
    """What is trained (A1111's Create-hypernetwork settings, under the file's key names) and how its prompts are
    built (the Train tab's)."""

    name: str  # the file name (A1111 lists hypernetworks by it: <hypernet:name:1>)
    layer_structure: list[float] = [1, 2, 1]  # widths as multiples of the context width; starts and ends with 1
    activation_func: str = "linear"  # "linear" = none; relu, leakyrelu, elu, swish, tanh, sigmoid, ...
    weight_initialization: str = "Normal"  # Normal (std 0.01), XavierUniform/Normal, KaimingUniform/Normal
    is_layer_norm: bool = False  # A1111's "Add layer normalization"
    use_dropout: bool = False
    dropout_structure: list[float] = []  # one value per layer_structure entry; [] = A1111's (0.3 on hidden layers)
    last_layer_dropout: bool = False  # with the derived structure: dropout after the last hidden layer too
    activate_output: bool = False  # the activation also after the last layer
    enable_sizes: list[int] = []  # context widths with modules; [] = the model's (SD 1.x: 768, 320, 640, 1280)
    template: str | list[str] = "hypernetwork"
    resume: str = ""  # a hypernetwork .pt to continue at its step, with its .optim when that belongs to it
    save_optimizer_state: bool = True  # <file>.pt.optim beside saved files, for resume

    def spec(self) -> HypernetworkSpec:
        dropout = self.dropout_structure or a1111_dropout_structure(self.layer_structure, self.use_dropout,
                                                                    self.last_layer_dropout)
        return HypernetworkSpec(tuple(float(v) for v in self.layer_structure), self.activation_func,
                                self.weight_initialization, self.is_layer_norm, self.use_dropout,
                                tuple(float(v) for v in dropout), self.activate_output)


class HypernetworkLogSection(A1111LogKeys):
    save_hypernetwork_every: int = Field(500, ge=0)  # hypernetworks/<name>-<step>.pt (+ .optim); 0 = off


class HypernetworkRunConfig(RunConfig):
    """train_hypernetwork.py. Defaults differ from the other trainers where A1111's do: lr 0.00001, no gradient
    clipping, torch's AdamW (weight decay 0.01), fp32 files named after the hypernetwork."""

    trainer_kind = "hypernetwork"

    hypernetwork: HypernetworkSection
    hypernetwork_log: HypernetworkLogSection = HypernetworkLogSection()

    @model_validator(mode="before")
    @classmethod
    def _a1111_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        section = data.get("hypernetwork") if isinstance(data.get("hypernetwork"), dict) else {}
        defaults = {("save", "precision"): "fp32", ("optimizer", "lr"): 0.00001, ("optimizer", "max_grad_norm"): 0.0}
        name = section.get("name")
        if isinstance(name, str) and _NAME.match(name):
            defaults[("save", "name")] = name
        if section.get("resume"):
            defaults[("save", "overwrite")] = True  # continuing replaces its later files, as A1111 does
        return fill_defaults(data, defaults)

    @model_validator(mode="after")
    def _hypernetwork_rules(self) -> "HypernetworkRunConfig":
        hn, problems = self.hypernetwork, prompt_rule_problems(self, "hypernetwork")
        if not _NAME.match(hn.name):
            problems.append(f"hypernetwork.name {hn.name!r}: use letters, digits, spaces, '.', '_' or '-' (A1111 "
                            "keeps only those in a hypernetwork's name and file name)")
        problems += structure_problems(hn.layer_structure, hn.dropout_structure, hn.use_dropout,
                                       hn.activation_func, hn.weight_initialization)
        if any(size < 1 for size in hn.enable_sizes) or len(set(hn.enable_sizes)) != len(hn.enable_sizes):
            problems.append(f"hypernetwork.enable_sizes = {hn.enable_sizes}: list each context width once, e.g. "
                            "[768, 320, 640, 1280]")
        ds = self.dataset
        if ds.reg_dir or any(subset.is_reg for subset in ds.subsets):
            problems.append("hypernetwork training uses no regularisation images (A1111's has none): remove "
                            "dataset.reg_dir and is_reg subsets")
        if problems:
            raise ValueError("\n".join(problems))  # one bullet each
        return self


def _resume_problems(config: HypernetworkRunConfig, header) -> list[str]:
    """A resumed file must fit the model and keep the structure the config sets explicitly."""
    from library.networks.compat import hypernetwork_problem
    from library.networks.hypernetwork import HypernetworkFileError, load_hypernetwork

    hn = config.hypernetwork
    try:
        network = load_hypernetwork(hn.resume)
    except HypernetworkFileError as err:
        return [f"hypernetwork.resume: {err}"]
    if problem := hypernetwork_problem(hn.resume, network.widths, header):
        return [f"hypernetwork.resume: {problem}"]
    wanted, found = hn.spec(), network.spec
    problems = []
    for key in STRUCTURE_KEYS:
        if key in hn.model_fields_set and getattr(wanted, key) != getattr(found, key):
            problems.append(f"hypernetwork.{key} = {getattr(hn, key)!r}, but {hn.resume} has {getattr(found, key)!r}: "
                            "a continued hypernetwork keeps its file's structure; remove the key or start a new one")
    if "enable_sizes" in hn.model_fields_set and sorted(hn.enable_sizes) != sorted(network.widths):
        problems.append(f"hypernetwork.enable_sizes = {hn.enable_sizes}, but {hn.resume} has modules for "
                        f"{network.widths}: remove the key to continue the file")
    return problems


class HypernetworkRecipe(Recipe):
    name = "hypernetwork"
    config_class = HypernetworkRunConfig
    path_keys = (("hypernetwork", "resume", "file"),)
    captionless = FILE_NAME  # A1111 fills [filewords] with the file name when an image has no caption

    def environment_problems(self, data: dict) -> list[str]:
        return prompt_key_problems(data, "hypernetwork")

    def optimizer_lrs(self, config: HypernetworkRunConfig) -> dict[str, float]:
        return {"hypernetwork": config.optimizer.lr}

    def model_problems(self, config: HypernetworkRunConfig, header) -> list[str]:
        hn = config.hypernetwork
        if hn.resume:
            return _resume_problems(config, header)
        known = default_sizes(header.context_dim, header.attention_widths)
        foreign = [size for size in hn.enable_sizes if size not in known]
        if foreign:
            return [f"hypernetwork.enable_sizes = {hn.enable_sizes}: {', '.join(map(str, foreign))} is no context "
                    f"width of this {header.family.label} model (its are {', '.join(map(str, known))}), so those "
                    "modules would never apply; remove them, or leave enable_sizes out to use the model's"]
        return []

    def model_lines(self, config: HypernetworkRunConfig, header) -> list[str]:
        hn = config.hypernetwork
        if hn.resume:
            return [f"hypernetwork: continues {hn.resume} (its structure and widths)"]
        spec = hn.spec()
        sizes = hn.enable_sizes or default_sizes(header.context_dim, header.attention_widths)
        values = sum(spec.parameter_count(size) for size in sizes)
        lines = [f"hypernetwork: {spec.describe()}; widths {', '.join(map(str, sizes))}; {values:,} trained values"]
        return lines + [f"note: {note}" for note in spec.comfy_notes()]

    def trained_parts(self, config: HypernetworkRunConfig) -> frozenset[str]:
        return frozenset()  # the base model is frozen: the hypernetwork's own modules train (always fp32)

    def text_encoder_trained_by(self, config: HypernetworkRunConfig) -> str | None:
        return None  # the text encoder is frozen and no gradient reaches it: its outputs may be cached

    def latent_draw(self, config: HypernetworkRunConfig, cached: bool) -> str:
        return config.hypernetwork.latent_sampling_method

    def longest_prompts(self, config: HypernetworkRunConfig, items: list) -> list[str]:
        from library.recipes.a1111_train import longest_template_prompts

        hn = config.hypernetwork
        return longest_template_prompts(config, items, hn.template, hn.name, 1, "hypernetwork.template")

    def adjust_plan(self, config: HypernetworkRunConfig, plan) -> PlanChange:
        hn = config.hypernetwork
        return a1111_plan(plan, hn.learn_rate, _recorded_step(hn.resume) if hn.resume else None)

    def build(self, parts, run) -> Built | None:
        # imported here: they pull in torch and diffusers, which --help/--check do not need
        from library.data.captions import CaptionOptions
        from library.data.prompts import PromptedData, template_lines
        from library.networks.hypernetwork_trainable import HypernetworkTrainable
        from library.recipes.a1111_train import first_rate
        from library.recipes.hypernetwork_log import HypernetworkLog

        config: HypernetworkRunConfig = run.config
        hn, ds = config.hypernetwork, config.dataset
        network, start, origin = _network(parts, run)
        if network is None:
            return None
        lr = first_rate(run.lr_schedule, network.step, run.plan.total_steps) or config.optimizer.lr
        trainable = HypernetworkTrainable(parts, network, lr, run.save_dtype)
        lines = template_lines(hn.template, "hypernetwork.template")
        options = CaptionOptions(ds.caption_prefix, ds.caption_suffix, hn.shuffle_tags, ds.keep_tokens,
                                 ds.caption_dropout_rate, hn.tag_dropout)
        prompted = PromptedData(run.data, lines, hn.name, 1, options, hn.use_alpha_weight, parts.vae_scale_factor)
        hooks = HypernetworkLog(config, trainable, run.plan)
        rate = f"A1111 schedule {hn.learn_rate!r}" if hn.learn_rate.strip() else f"{config.optimizer.lr:g}"
        described = [trainable.describe(), f"start: {origin}",
                     f"template: {len(lines)} line(s), e.g. {lines[0]!r}; latent sampling: "
                     f"{hn.latent_sampling_method}" + ("; PNG alpha weighs the loss" if hn.use_alpha_weight else ""),
                     f"learning rate: {rate}", f"A1111 log folder: {hooks.folder}"]
        return Built(trainable, hooks, start, prompted, described)


def _recorded_step(path: str) -> int:
    """The step a hypernetwork file records (0 when it cannot be read; the model check says why)."""
    from library.networks.hypernetwork import HypernetworkFileError, load_hypernetwork

    try:
        return load_hypernetwork(path).step
    except HypernetworkFileError:
        return 0


def _network(parts, run):
    """(network, start point, where it starts from): a new network initialised A1111's way, or hypernetwork.resume
    at its step with its .optim; (None, None, "") after saying why when the file is already trained that far."""
    import torch

    from library.models.hashes import a1111_short_hash
    from library.networks.hypernetwork import Hypernetwork, load_hypernetwork, load_optimizer_state, unet_widths
    from library.recipes.a1111_train import start_progress
    from library.registry import canonical_optimizer_name
    from library.training.trainable import StartPoint

    config: HypernetworkRunConfig = run.config
    hn, start = config.hypernetwork, None
    if hn.resume:
        network = load_hypernetwork(hn.resume)
        if network.step >= run.plan.total_steps:
            print(f"{hn.resume} was already trained for {network.step} steps, at or beyond this run's "
                  f"{run.plan.total_steps}: nothing to train; raise train.max_steps (or the schedule's last step) "
                  "to continue")
            return None, None, ""
        state, message = load_optimizer_state(Path(hn.resume), canonical_optimizer_name(config.optimizer.name))
        print(message)
        start = StartPoint(start_progress(network.step, run.plan), state)
        origin = f"{hn.resume} (step {network.step})"
    else:
        network = Hypernetwork(hn.spec(), hn.enable_sizes or unet_widths(parts))
        network.initialise(torch.Generator().manual_seed(config.train.seed))
        origin = f"new, {hn.weight_initialization} initialisation (seed {config.train.seed})"
    network.name = hn.name
    network.sd_checkpoint = a1111_short_hash(config.model.path)
    network.sd_checkpoint_name = Path(parts.source).stem if parts.source else None
    return network, start, origin


RECIPE = HypernetworkRecipe()
