"""What textual inversion and hypernetworks share from A1111's Train tab: the prompt keys (template, schedule
string, tag shuffling and dropout, latent sampling, alpha weights) and the log-folder keys, the dataset rules
they imply, and how a schedule string and a continued file's step change the plan. Light (no torch): config
checks use it; the log folder itself is a1111_folder.py."""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from library.config.schema import RunConfig, Section
from library.recipes.base import PlanChange, table, value_of

if TYPE_CHECKING:
    from library.training.checkpoints import Progress
    from library.training.plan import TrainingPlan


class A1111PromptKeys(Section):
    """How the training prompts are built and the rate scheduled, as A1111's Train tab names them."""

    template: str | list[str] = "subject_filewords"  # a built-in name, a .txt file, or the lines themselves
    learn_rate: str = ""  # A1111 schedule "0.05:10, 0.02:20, 0.005"; "" = optimizer.lr + optimizer.scheduler
    shuffle_tags: bool = False  # shuffle the [filewords] tags per step
    tag_dropout: float = Field(0.0, ge=0, le=1)  # drop each [filewords] tag with this probability per step
    latent_sampling_method: Literal["once", "deterministic", "random"] = "once"
    use_alpha_weight: bool = False  # PNG transparency weighs the loss (images without alpha weigh 1)

    @field_validator("learn_rate", mode="before")
    @classmethod
    def _rate_as_text(cls, value: Any) -> Any:
        # `learn_rate = 0.005` (a TOML number, or a command-line override) means the one-rate schedule "0.005"
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class A1111LogKeys(Section):
    """A1111's log folder <logging.log_dir>/<date>/<name>/: previews and the loss CSV (key names as in A1111)."""

    create_image_every: int = Field(500, ge=0)  # images/<name>-<step>.png; 0 = off
    write_csv_every: int = Field(500, ge=0)  # the loss CSV; 0 = off
    preview_prompt: str = ""  # "" = the step's first training prompt (A1111's default)
    preview_negative_prompt: str = ""
    preview_steps: int = Field(20, ge=1, le=150)
    preview_cfg_scale: float = Field(7.0, ge=0)
    preview_seed: int = -1  # -1 = a new seed per preview, derived from train.seed and the step
    preview_width: int = Field(0, ge=0, multiple_of=8)  # 0 = dataset.resolution
    preview_height: int = Field(0, ge=0, multiple_of=8)


def prompt_rule_problems(config: RunConfig, section: str) -> list[str]:
    """Dataset keys A1111's prompt keys replace or rule out (`section`: the trainer's, e.g. "hypernetwork")."""
    ds, keys, problems = config.dataset, getattr(config, section), []
    for key, replacement in (("shuffle_caption", "shuffle_tags"), ("caption_tag_dropout_rate", "tag_dropout")):
        if getattr(ds, key):
            problems.append(f"A1111's templates shuffle and drop [filewords] tags with {section}.{replacement}: set "
                            f"that instead of dataset.{key}")
    if ds.cache_text_encoder_outputs and (keys.shuffle_tags or keys.tag_dropout):
        problems.append(f"{section}.shuffle_tags / tag_dropout change the prompts every step, so the text encoder's "
                        "outputs cannot be cached: set dataset.cache_text_encoder_outputs = false")
    if keys.use_alpha_weight and ds.random_crop:
        problems.append(f"{section}.use_alpha_weight needs the same crop for image and alpha: set "
                        "dataset.random_crop = false")
    if keys.learn_rate.strip() and (config.optimizer.scheduler.strip().lower() != "constant"
                                    or config.optimizer.warmup_steps or config.optimizer.warmup_ratio):
        problems.append(f"{section}.learn_rate sets the whole learning-rate schedule: remove optimizer.scheduler/"
                        f"warmup, or set {section}.learn_rate = \"\" to use them")
    return problems


def prompt_key_problems(data: dict, section: str) -> list[str]:
    """The template and schedule string of raw config data (they need files and the schedule parser)."""
    from library.data.prompts import template_problem
    from library.training.schedules import A1111Schedule

    problems = []
    template = table(data, section).get("template", "subject_filewords")
    if isinstance(template, (str, list)) and (problem := template_problem(template, f"{section}.template")):
        problems.append(problem)
    rate = table(data, section).get("learn_rate", "")
    rate = str(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else rate
    if isinstance(rate, str) and rate.strip():
        try:
            A1111Schedule(rate, value_of(data, "train", "max_steps", int) or 10**9)
        except ValueError as err:
            problems.append(f"{section}.learn_rate: {err}")
    return problems


def a1111_plan(plan: "TrainingPlan", learn_rate: str, done: int | None = None) -> PlanChange:
    """The plan with the steps a continued file has done, and an A1111 schedule string, which replaces the
    scheduler and ends training at its last explicit step."""
    from library.training.schedules import A1111Schedule

    if done is not None:
        plan = dataclasses.replace(plan, done=done)
    if not learn_rate.strip():
        return PlanChange(plan)
    schedule, notes = A1111Schedule(learn_rate, plan.total_steps), []
    if schedule.last_step < plan.total_steps:
        total = schedule.last_step
        notes.append(f"note: the learning-rate schedule ends at step {total}, before the planned "
                     f"{plan.total_steps}: training stops there")
        plan = dataclasses.replace(plan, total_steps=total, epochs=math.ceil(total / plan.steps_per_epoch))
    if schedule.ignored:
        notes.append(f"note: learning-rate schedule entries after the last step are ignored: "
                     f"{', '.join(schedule.ignored)}")
    return PlanChange(plan, learn_rate, tuple(notes))


def first_rate(schedule: str | None, step: int, total_steps: int) -> float | None:
    """The rate a run starting at `step` begins with under an A1111 schedule string (None without one)."""
    from library.training.schedules import A1111Schedule

    return A1111Schedule(schedule, total_steps, step).rate_at(step) if schedule else None


def start_progress(step: int, plan: "TrainingPlan") -> "Progress":
    """Where a run continuing a file saved after `step` optimizer steps stands: epoch and next batch."""
    from library.training.checkpoints import Progress

    per_epoch = plan.steps_per_epoch
    return Progress(step, step // per_epoch, (step % per_epoch) * plan.accumulation)


def longest_template_prompts(config: RunConfig, items: list, template, name: str, vectors: int, key: str) -> list[str]:
    """Per image, the longest prompt its template lines give (checked against train.max_token_length)."""
    from library.data.prompts import fill_template, filename_words, template_lines
    from library.networks.embedding_names import expand_name

    ds, lines = config.dataset, template_lines(template, key)
    longest = []
    for item in items:
        words = item.caption if item.caption_from_file else filename_words(item.path)
        words = ", ".join(p for p in (ds.caption_prefix.strip(), words, ds.caption_suffix.strip()) if p)
        longest.append(max((expand_name(fill_template(line, name, words), name, vectors) for line in lines), key=len))
    return longest
