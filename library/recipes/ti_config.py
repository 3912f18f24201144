"""The [embedding] and [ti_log] sections of train_textual_inversion.py and its run config (A1111's knobs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from library.config.schema import RunConfig, Section, fill_defaults


class EmbeddingSection(Section):
    """What textual inversion trains: new token vectors, and how its prompts are built (A1111's Train tab)."""

    name: str  # the trigger word; also the file name (A1111 reads the trigger from it)
    init_text: str = ""  # its token embeddings start the vectors; "" = zeros, as in A1111
    vectors: int = Field(1, ge=1, le=75)  # vectors per token: more capture more, but use up the 75-token prompt
    template: str | list[str] = "subject_filewords"  # a built-in name, a .txt file, or the lines themselves
    learn_rate: str = ""  # A1111 schedule "0.05:10, 0.02:20, 0.005"; "" = optimizer.lr + optimizer.scheduler
    shuffle_tags: bool = False  # shuffle the [filewords] tags per step
    tag_dropout: float = Field(0.0, ge=0, le=1)  # drop each [filewords] tag with this probability per step
    latent_sampling_method: Literal["once", "deterministic", "random"] = "once"
    use_alpha_weight: bool = False  # PNG transparency weighs the loss (images without alpha weigh 1)
    format: Literal["pt", "safetensors"] = "pt"
    resume: str = ""  # an embedding file (.pt/.safetensors/.png) to continue, with its .optim when present
    save_optimizer_state: bool = True  # write <file>.optim beside saved .pt files, for resume

    @field_validator("learn_rate", mode="before")
    @classmethod
    def _rate_as_text(cls, value: Any) -> Any:
        # `learn_rate = 0.005` (a TOML number, or a command-line override) means the one-rate schedule "0.005"
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class TiLogSection(Section):
    """A1111's log folder <logging.log_dir>/<date>/<name>/ (key names as in A1111's Train tab)."""

    save_embedding_every: int = Field(500, ge=0)  # embeddings/<name>-<step>.pt; 0 = off
    create_image_every: int = Field(500, ge=0)  # images/<name>-<step>.png; 0 = off
    save_image_with_stored_embedding: bool = True  # image_embeddings/<name>-<step>.png with the PNG chunk
    write_csv_every: int = Field(500, ge=0)  # textual_inversion_loss.csv; 0 = off
    preview_prompt: str = ""  # "" = the step's first training prompt (A1111's default)
    preview_negative_prompt: str = ""
    preview_steps: int = Field(20, ge=1, le=150)
    preview_cfg_scale: float = Field(7.0, ge=0)
    preview_seed: int = -1  # -1 = a new seed per preview, derived from train.seed and the step
    preview_width: int = Field(0, ge=0, multiple_of=8)  # 0 = dataset.resolution
    preview_height: int = Field(0, ge=0, multiple_of=8)


class TIRunConfig(RunConfig):
    """train_textual_inversion.py. Defaults differ from the other trainers where A1111's do: lr 0.005, no
    gradient clipping, AdamW without weight decay, fp32 files named after the embedding."""

    embedding: EmbeddingSection
    ti_log: TiLogSection = TiLogSection()

    @model_validator(mode="before")
    @classmethod
    def _a1111_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from library.networks.embeddings import name_problem

        embedding = data.get("embedding") if isinstance(data.get("embedding"), dict) else {}
        optimizer = data.get("optimizer") if isinstance(data.get("optimizer"), dict) else {}
        defaults = {("save", "precision"): "fp32",  # a few kilobytes: no reason to round them
                    ("optimizer", "lr"): 0.005, ("optimizer", "max_grad_norm"): 0.0}
        name = embedding.get("name")
        if isinstance(name, str) and name_problem(name) is None:
            defaults[("save", "name")] = name
        if embedding.get("resume"):
            defaults[("save", "overwrite")] = True  # continuing an embedding replaces its later files, as in A1111
        if str(optimizer.get("name", "AdamW")).lower().replace("_", "").startswith("adamw"):
            defaults[("optimizer", "args")] = {"weight_decay": 0.0}  # AdamW's default (0.01) shrinks the vectors
        return fill_defaults(data, defaults)

    @model_validator(mode="after")
    def _ti_rules(self) -> "TIRunConfig":
        problems = _embedding_problems(self.embedding) + _ti_dataset_problems(self)
        if self.embedding.learn_rate.strip():
            opt = self.optimizer
            if opt.scheduler.strip().lower() != "constant" or opt.warmup_steps or opt.warmup_ratio:
                problems.append("embedding.learn_rate sets the whole learning-rate schedule: remove "
                                "optimizer.scheduler/warmup, or set embedding.learn_rate = \"\" to use them")
            try:
                from library.training.schedules import A1111Schedule

                A1111Schedule(self.embedding.learn_rate, self.train.max_steps or 10**9)
            except ValueError as err:
                problems.append(f"embedding.learn_rate: {err}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _embedding_problems(embedding: EmbeddingSection) -> list[str]:
    from library.networks.embeddings import name_problem, vocabulary_problem
    from library.recipes.ti_training import template_problem

    problem = name_problem(embedding.name)
    if problem is None:
        try:
            from library.models.clip_tokenizer import TokenizerUnavailable, build_clip_tokenizer

            problem = vocabulary_problem(build_clip_tokenizer(), embedding.name, embedding.vectors)
        except TokenizerUnavailable:
            pass  # checked again against the model's own tokenizer when it loads
    problems = [problem] if problem else []
    if problem := template_problem(embedding.template):
        problems.append(problem)
    if embedding.resume and not Path(embedding.resume).expanduser().is_file():
        problems.append(f"embedding.resume: file not found: {embedding.resume}")
    return problems


def _ti_dataset_problems(config: "TIRunConfig") -> list[str]:
    ds, problems = config.dataset, []
    for key, replacement in (("shuffle_caption", "embedding.shuffle_tags"),
                             ("caption_tag_dropout_rate", "embedding.tag_dropout")):
        if getattr(ds, key):
            problems.append(f"textual inversion shuffles and drops [filewords] tags with {replacement} (A1111's "
                            f"setting): set that instead of dataset.{key}")
    if ds.reg_dir or any(subset.is_reg for subset in ds.subsets):
        problems.append("textual inversion uses no regularisation images (the model does not change, so there "
                        "is nothing to preserve): remove dataset.reg_dir and is_reg subsets")
    if getattr(ds, "cache_text_encoder_outputs", False):
        problems.append("textual inversion trains what the text encoder reads, so its outputs cannot be "
                        "cached: set dataset.cache_text_encoder_outputs = false")
    if config.embedding.use_alpha_weight and ds.random_crop:
        problems.append("embedding.use_alpha_weight needs the same crop for image and alpha: set "
                        "dataset.random_crop = false")
    return problems
