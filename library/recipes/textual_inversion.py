"""train_textual_inversion.py's recipe: new token vectors trained the A1111 way (templates, schedule string,
latent sampling methods, log folder, `.optim` resume); the model itself never changes."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from library.config.schema import RunConfig, fill_defaults
from library.data.captions import FILE_NAME
from library.networks.embedding_names import name_problem
from library.recipes.a1111_train import A1111LogKeys, A1111PromptKeys, prompt_rule_problems
from library.recipes.base import Built, PlanChange, Recipe, model_family, value_of


class EmbeddingSection(A1111PromptKeys):
    """What textual inversion trains: new token vectors; how its prompts are built is A1111's Train tab's keys
    (A1111PromptKeys: template, learn_rate, shuffle_tags, tag_dropout, latent_sampling_method, use_alpha_weight)."""

    name: str  # the trigger word; also the file name (A1111 reads the trigger from it)
    init_text: str = ""  # its token embeddings start the vectors; "" = zeros, as in A1111
    vectors: int = Field(1, ge=1, le=75)  # vectors per token: more capture more, but use up the 75-token prompt
    # "auto": A1111's .pt for SD 1.x/2.x, .safetensors for SDXL (.pt has no SDXL form)
    format: Literal["auto", "pt", "safetensors"] = "auto"
    resume: str = ""  # an embedding file (.pt/.safetensors/.png) to continue, with its .optim when present
    save_optimizer_state: bool = True  # write <file>.optim beside saved .pt files, for resume


class TiLogSection(A1111LogKeys):
    """A1111's log folder <logging.log_dir>/<date>/<name>/ (key names as in A1111's Train tab)."""

    save_embedding_every: int = Field(500, ge=0)  # embeddings/<name>-<step>.pt; 0 = off
    save_image_with_stored_embedding: bool = True  # image_embeddings/<name>-<step>.png with the PNG chunk


class TIRunConfig(RunConfig):
    """train_textual_inversion.py. Defaults differ from the other trainers where A1111's do: lr 0.005, no
    gradient clipping, AdamW without weight decay, fp32 files named after the embedding."""

    trainer_kind = "textual_inversion"

    embedding: EmbeddingSection
    ti_log: TiLogSection = TiLogSection()

    @model_validator(mode="before")
    @classmethod
    def _a1111_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
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
        problems = prompt_rule_problems(self, "embedding")
        if problem := name_problem(self.embedding.name):
            problems.append(problem)
        ds = self.dataset
        if ds.reg_dir or any(subset.is_reg for subset in ds.subsets):
            problems.append("textual inversion uses no regularisation images (the model does not change, so there "
                            "is nothing to preserve): remove dataset.reg_dir and is_reg subsets")
        if ds.cache_text_encoder_outputs and not (self.embedding.shuffle_tags or self.embedding.tag_dropout):
            problems.append("textual inversion trains what the text encoder reads, so its outputs cannot be "
                            "cached: set dataset.cache_text_encoder_outputs = false")
        if problems:
            raise ValueError("\n".join(problems))  # one bullet each
        return self


class TextualInversionRecipe(Recipe):
    name = "textual_inversion"
    script = "train_textual_inversion.py"
    config_class = TIRunConfig
    path_keys = (("embedding", "resume", "file"),)
    captionless = FILE_NAME

    def environment_problems(self, data: dict) -> list[str]:
        from library.models.clip_tokenizer import TokenizerUnavailable, clip_vocabulary
        from library.networks.embedding_names import vocabulary_problem
        from library.recipes.a1111_train import prompt_key_problems

        problems = []
        name, vectors = value_of(data, "embedding", "name", str), value_of(data, "embedding", "vectors", int, 1)
        if name and name_problem(name) is None:
            try:  # checked again against the model's own tokenizer when it loads
                if problem := vocabulary_problem(clip_vocabulary(), name, vectors):
                    problems.append(problem)
            except TokenizerUnavailable:
                pass
        family = model_family(data)
        if family is not None and value_of(data, "embedding", "format", str) == "pt":
            try:
                _file_format("pt", family)
            except ValueError as err:
                problems.append(str(err))
        return problems + prompt_key_problems(data, "embedding")

    def optimizer_lrs(self, config: TIRunConfig) -> dict[str, float]:
        return {"embedding": config.optimizer.lr}

    def lr_settings(self, config: TIRunConfig) -> list[str]:
        if config.embedding.learn_rate.strip():
            return [f"embedding.learn_rate = {config.embedding.learn_rate.strip()!r}"]
        return [f"optimizer.lr = {config.optimizer.lr:g}"]

    def save_sizes(self, config: TIRunConfig, header):
        from library.registry import canonical_optimizer_name
        from library.training.disk_space import SaveSizes, state_bytes

        params = config.embedding.vectors * sum(header.text_widths)
        state = state_bytes(params, canonical_optimizer_name(config.optimizer.name))
        optim = state if config.embedding.save_optimizer_state else 0  # the .optim beside each embedding
        return SaveSizes(params * 4 + optim + 4096, state)

    def model_problems(self, config: TIRunConfig, header) -> list[str]:
        from library.networks.compat import embedding_problem
        from library.networks.embeddings import EmbeddingError, load_embedding

        if not config.embedding.resume:
            return []
        try:
            embedding = load_embedding(config.embedding.resume)
        except EmbeddingError as err:
            return [f"embedding.resume: {err}"]
        problem = embedding_problem(config.embedding.resume, embedding.vectors.shape[1], header)
        return [f"embedding.resume: {problem}"] if problem else []

    def trained_parts(self, config: TIRunConfig) -> frozenset[str]:
        # the new vectors start from rows of the token embeddings: read exact, then cast with the frozen rest
        return frozenset({"token_embeddings"})

    def text_encoder_trained_by(self, config: TIRunConfig) -> str | None:
        return None  # the encoder's weights never change; caching is refused by the config's own rule

    def latent_draw(self, config: TIRunConfig, cached: bool) -> str:
        return config.embedding.latent_sampling_method

    def longest_prompts(self, config: TIRunConfig, items: list) -> list[str]:
        from library.data.prompts import fill_template, filename_words, template_lines
        from library.networks.embedding_names import expand_name

        emb, ds = config.embedding, config.dataset
        lines = template_lines(emb.template)
        longest = []
        for item in items:
            words = item.caption if item.caption_from_file else filename_words(item.path)
            words = ", ".join(p for p in (ds.caption_prefix.strip(), words, ds.caption_suffix.strip()) if p)
            filled = [expand_name(fill_template(line, emb.name, words), emb.name, emb.vectors) for line in lines]
            longest.append(max(filled, key=len))
        return longest

    def adjust_plan(self, config: TIRunConfig, plan) -> PlanChange:
        """An A1111 schedule string replaces the scheduler and ends training at its last explicit step."""
        from library.recipes.a1111_train import a1111_plan

        done = _recorded_step(config.embedding.resume) if config.embedding.resume else None
        return a1111_plan(plan, config.embedding.learn_rate, done)

    def build(self, parts, run) -> Built | None:
        # imported here: they pull in torch and diffusers, which --help/--check do not need
        from library.data.prompts import PromptedData, template_lines
        from library.networks.embedding_names import expand_name
        from library.networks.embedding_trainable import EmbeddingTrainable
        from library.models.hashes import a1111_short_hash
        from library.networks.embeddings import init_vectors
        from library.recipes.a1111_log import A1111Log
        from library.recipes.a1111_train import first_rate
        from library.recipes.resolve import caption_options

        config: TIRunConfig = run.config
        emb, ds = config.embedding, config.dataset
        keys = [slot.embedding_key for slot in parts.family.text_encoders]
        dims = [encoder.get_input_embeddings().weight.shape[1] for encoder in parts.text_encoders]
        file_format = _file_format(emb.format, parts.family)
        resumed = _resumed_embedding(config, keys, dims)
        step = resumed.step or 0 if resumed else 0
        if step >= run.plan.total_steps:
            print(f"{emb.resume} was already trained for {step} steps, at or beyond this run's "
                  f"{run.plan.total_steps}: nothing to train; raise train.max_steps (or the schedule's last step) "
                  "to continue")
            return None
        if resumed:
            start, origin = _start_point(config, resumed, run.plan), f"{emb.resume} (step {step})"
            vectors = resumed.tensors_for(keys)
        else:
            start = None
            starts = [init_vectors(tokenizer, encoder, emb.init_text, emb.vectors)
                      for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders)]
            vectors, origin = [vec for vec, _ in starts], starts[0][1]
        ids = _add_tokens(parts, emb.name, emb.vectors)
        lr = first_rate(run.lr_schedule, step, run.plan.total_steps) or config.optimizer.lr
        trainable = EmbeddingTrainable(parts, emb.name, vectors, ids, lr, file_format, run.save_dtype,
                                       a1111_short_hash(config.model.path))
        lines = template_lines(emb.template)
        options = dataclasses.replace(caption_options(ds), shuffle=emb.shuffle_tags, tag_dropout_rate=emb.tag_dropout)
        latent_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        prompted = PromptedData(run.data, lines, emb.name, emb.vectors, options, emb.use_alpha_weight, latent_factor)
        if not prompted.name_reaches_prompts():
            raise ValueError(f"no training prompt contains the embedding: no line of embedding.template has [name] "
                             f"and no caption mentions {emb.name!r}; use a template with [name], such as "
                             "subject_filewords or \"[name], [filewords]\"")
        hooks = A1111Log(config, trainable, run.plan)
        described = _describe(config, dims, origin, lines) + [f"A1111 log folder: {hooks.folder}"]
        return Built(trainable, hooks, start, prompted, described,
                     lambda text: expand_name(text, emb.name, emb.vectors))


def _recorded_step(path: str) -> int:
    """The step an embedding file records (0 when it records none or cannot be read; build says why)."""
    from library.networks.embeddings import EmbeddingError, load_embedding

    try:
        return load_embedding(path).step or 0
    except EmbeddingError:
        return 0


def _file_format(setting: str, family) -> str:
    """embedding.format resolved for the model: "auto" is A1111's .pt where it can hold the embedding."""
    one_encoder = len(family.text_encoders) == 1
    if setting == "auto":
        return "pt" if one_encoder else "safetensors"
    if setting == "pt" and not one_encoder:
        raise ValueError(f"embedding.format = \"pt\": A1111's .pt embedding holds one text encoder's vectors and has "
                         f"no {family.label} form; use \"safetensors\" (or \"auto\"): "
                         f"{{{', '.join(repr(s.embedding_key) for s in family.text_encoders)}}}, which A1111, ComfyUI "
                         "and diffusers load")
    return setting


def _add_tokens(parts, name: str, vectors: int) -> list[int]:
    """The embedding's tokens in every tokenizer (the same ids: they share one vocabulary)."""
    from library.networks.embeddings import add_tokens

    ids = [add_tokens(tokenizer, encoder, name, vectors)
           for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders)]
    if any(other != ids[0] for other in ids[1:]):
        raise ValueError(f"the tokenizers gave {name!r} different token ids ({ids}); they must share a vocabulary")
    return ids[0]


def _resumed_embedding(config: TIRunConfig, keys: list[str], dims: list[int]):
    """embedding.resume's Embedding (checked against the model's text encoders), or None for a fresh start."""
    from library.networks.embeddings import load_embedding

    emb = config.embedding
    if not emb.resume:
        return None
    embedding = load_embedding(emb.resume)
    for key, dim, vectors in zip(keys, dims, embedding.tensors_for(keys)):
        if tuple(vectors.shape) != (emb.vectors, dim):
            where = f" ({key})" if len(keys) > 1 else ""
            raise ValueError(f"embedding.resume: {emb.resume} holds vectors of shape {tuple(vectors.shape)}{where}, "
                             f"but this run trains {emb.vectors} vector(s) of width {dim} for this model; set "
                             f"embedding.vectors = {vectors.shape[0]} or pick the matching model")
    if embedding.step is None:
        print(f"note: {emb.resume} does not record its step; continuing from step 0")
    return embedding


def _start_point(config: TIRunConfig, resumed, plan):
    """Continue a resumed embedding at its step, with the optimizer state of its `.optim` file when that file
    belongs to it (A1111's checksum) and to this optimizer."""
    from library.networks.embeddings import load_optimizer_state
    from library.recipes.a1111_train import start_progress
    from library.registry import canonical_optimizer_name
    from library.training.trainable import StartPoint

    step = resumed.step or 0
    state, message = load_optimizer_state(Path(config.embedding.resume), resumed.checksum_values(),
                                          canonical_optimizer_name(config.optimizer.name))
    print(message)
    return StartPoint(start_progress(step, plan), state)


def _describe(config: TIRunConfig, dims: list[int], origin: str, lines: list[str]) -> list[str]:
    from library.networks.embedding_names import token_names

    emb, opt = config.embedding, config.optimizer
    rate = f"A1111 schedule {emb.learn_rate!r}" if emb.learn_rate.strip() else f"{opt.lr:g} ({opt.scheduler})"
    width = " + ".join(map(str, dims)) if len(dims) > 1 else str(dims[0])
    each = " (one set per text encoder)" if len(dims) > 1 else ""
    described = [
        f"embedding: {emb.name!r}, {emb.vectors} vector(s) x {width}{each} = {emb.vectors * sum(dims):,} trained "
        f"values; prompts use the tokens: {' '.join(token_names(emb.name, emb.vectors))}",
        f"start: {origin}",
        f"template: {len(lines)} line(s), e.g. {lines[0]!r}; latent sampling: {emb.latent_sampling_method}"
        + ("; PNG alpha weighs the loss" if emb.use_alpha_weight else ""),
        f"learning rate: {rate}",
    ]
    if config.save.name != emb.name:
        described.append(f"note: files are named {config.save.name!r}; A1111 takes the trigger word from the file "
                         f"name, so there the trigger is {config.save.name!r}, not {emb.name!r}")
    return described


RECIPE = TextualInversionRecipe()
