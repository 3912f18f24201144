"""The recipe interface: what a trainer kind contributes to a run. `run.py` calls these in order:
config_class (validate) → path_keys / environment_problems (checks) → before_scan → extra_subsets /
text_encoder_trained_by / latent_draw / adjust_plan (resolve) → build (after the model loads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from library.data.captions import CLASS_TOKENS

if TYPE_CHECKING:  # the heavy modules load only once the config is valid (fast --help and --check)
    from library.config.schema import RunConfig
    from library.data.batches import TrainingData
    from library.data.folders import ImageItem, Subset
    from library.models.header import ModelHeader
    from library.models.parts import ModelParts
    from library.training.hooks import TrainerHooks
    from library.training.plan import TrainingPlan
    from library.training.disk_space import SaveSizes
    from library.training.resolved import ResolvedRun
    from library.training.trainable import StartPoint, Trainable


@dataclass
class Built:
    """What a recipe's build returns: what is trained, its hooks, and what else the loop needs from it."""

    trainable: "Trainable"
    hooks: "TrainerHooks | None" = None
    start: "StartPoint | None" = None  # where training starts, when not at step 0 from scratch
    data: "TrainingData | None" = None  # replaces the run's data (textual inversion's prompts)
    lines: list[str] = field(default_factory=list)  # what is trained, printed before training
    prompt_transform: Callable[[str], str] | None = None  # rewrites preview prompts (multi-vector names)


@dataclass(frozen=True)
class PlanChange:
    """How a recipe changes the step plan and LR schedule (textual inversion's A1111 schedule string)."""

    plan: "TrainingPlan"
    lr_schedule: str | None = None
    notes: tuple[str, ...] = ()


class Recipe:
    """Base class; each trainer module defines one subclass and a module-level `RECIPE` instance."""

    name: str = ""
    script: str = ""  # the root script that runs this recipe (for the command that resumes a run)
    config_class: type["RunConfig"]
    # (section, key, "file" | "folder") of this trainer's own paths: resolved and checked like the shared ones
    path_keys: tuple[tuple[str, str, str], ...] = ()
    captionless = CLASS_TOKENS  # what an image without a caption trains with (the summary says it)
    # the artifact is the whole model: its VAE is saved too, so it stays fp32 (not rounded to the compute
    # dtype) and is kept, off the device, once latents are cached
    saves_base_model = False

    def environment_problems(self, data: dict) -> list[str]:
        """Checks of this trainer's sections that need files, a registry or a tokenizer, on the raw config data
        (so they are reported beside schema errors). Values may be missing or of the wrong type."""
        return []

    def optimizer_lrs(self, config: "RunConfig") -> dict[str, float]:
        """The learning rate of each parameter group the run will have (checked before any model loads)."""
        return {"model": config.optimizer.lr}

    def lr_settings(self, config: "RunConfig") -> list[str]:
        """The learning-rate keys in effect as `key = value` (named when the loss diverges)."""
        return [f"optimizer.lr = {config.optimizer.lr:g}"]

    def save_sizes(self, config: "RunConfig", header: "ModelHeader") -> "SaveSizes | None":
        """The estimated size of one saved artifact and one state, from the model's parameter counts (read
        without loading it); None when they are unknown."""
        return None

    def model_lines(self, config: "RunConfig", header: "ModelHeader") -> list[str]:
        """What this run trains on this model, told from its header (no weights): printed under the model line,
        also by --check."""
        return []

    def model_problems(self, config: "RunConfig", header: "ModelHeader") -> list[str]:
        """Problems of this trainer's files against the model's family and widths (read from its header, not
        its weights), e.g. an init file made for another family."""
        return []

    def before_scan(self, config: "RunConfig", check_only: bool, load_model: Callable[[], "ModelParts"]) -> None:
        """Work before the dataset scan (DreamBooth generates its class images); `load_model` loads the base
        model once for this and for training."""

    def extra_subsets(self, config: "RunConfig") -> list["Subset"]:
        """Folders this trainer adds to the dataset (DreamBooth's class_dir)."""
        return []

    def text_encoder_trained_by(self, config: "RunConfig") -> str | None:
        """The config key that makes this run change a text encoder's output (then its outputs cannot be
        cached), or None when no text encoder trains."""
        raise NotImplementedError

    def trained_parts(self, config: "RunConfig") -> frozenset[str]:
        """The parts of the base model whose own weights this run trains ("unet", "text_encoders",
        "token_embeddings": library/models/dtypes.py PART_NAMES): they load in fp32, the frozen rest straight
        into the run's compute dtype (train.mixed_precision)."""
        raise NotImplementedError

    def latent_draw(self, config: "RunConfig", cached: bool) -> str:
        """How latents are drawn from the VAE's distribution (library/data/sources.py LATENT_DRAWS)."""
        return "once" if cached else "step"

    def longest_prompts(self, config: "RunConfig", items: list["ImageItem"]) -> list[str]:
        """Per image, the longest text its prompts give the text encoder (checked against max_token_length)."""
        ds = config.dataset
        return [", ".join(p for p in (ds.caption_prefix.strip(), item.caption.strip(), ds.caption_suffix.strip()) if p)
                for item in items]

    def adjust_plan(self, config: "RunConfig", plan: "TrainingPlan") -> PlanChange:
        return PlanChange(plan)

    def build(self, parts: "ModelParts", run: "ResolvedRun") -> Built | None:
        """What is trained and its hooks, on the loaded model; None (after saying why) when there is nothing
        to train. ValueError for a problem only the model shows (printed as one line)."""
        raise NotImplementedError


def table(data: dict, name: str) -> dict:
    """A section of raw config data, or {} when it is missing or not a table."""
    value = data.get(name)
    return value if isinstance(value, dict) else {}


def value_of(data: dict, section: str, key: str, kind: type, default: Any = None) -> Any:
    """A raw config value when it has the expected type, else `default` (the schema reports wrong types)."""
    value = table(data, section).get(key, default)
    return value if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) else default


def part_lr_settings(section: str, values: Any, lr: float, parts: list[str]) -> list[str]:
    """lr_settings of a trainer with `<section>.<part>_lr` keys that fall back to optimizer.lr."""
    settings = []
    for part in parts:
        own = getattr(values, f"{part}_lr", None)
        shown = f"[{', '.join(f'{v:g}' for v in own)}]" if isinstance(own, (list, tuple)) else f"{own:g}" if own else ""
        settings.append(f"{section}.{part}_lr = {shown}" if own else f"optimizer.lr = {lr:g} (for the {part})")
    return settings


def model_family(data: dict):
    """The ModelFamily of the raw config's model.path when it can be told without loading weights, else None
    (recipes check family-dependent keys with it before any model loads)."""
    from library.models.detect import family_of_path
    from library.models.paths import model_path_problem

    path = value_of(data, "model", "path", str)
    if not path or model_path_problem(path):
        return None
    return family_of_path(path)
