"""Textual inversion on the shared loop: the new token vectors as a `Trainable`, prompts from A1111 templates,
A1111's latent sampling methods and alpha loss weights, and A1111's log folder (embedding copies with their
optimizer state, preview images, the loss CSV) as `TrainerHooks`."""
from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from library.training.checkpoints import Progress
from library.recipes.ti_config import TIRunConfig
from library.data.folders import CaptionOptions, process_caption
from library.networks.embeddings import (Embedding, EmbeddingError, add_tokens, expand_name, init_vectors, load_embedding,
                                load_optimizer_state, save_embedding, save_optimizer_state, save_png, token_names)
from library.data.images import load_alpha, resize_and_crop
from library.data.latent_cache import encode_distribution, sample_latent
from library.models.loading import ModelParts
from library.training.optimizers import canonical_optimizer_name
from library.training.plan import TrainingPlan
from library.sampling.preview import SampleSpec, generate
from library.training.schedules import A1111Schedule, a1111_lambda_scheduler
from library.training.trainer import LoopParts, Trainer, TrainerHooks
from library.data.sources import Batch, LatentSource, TrainingData, derived_rng, hash_ints

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # A1111 strips "01-", "123 " from file names used as captions
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CSV_NAME = "textual_inversion_loss.csv"


# ---------------------------------------------------------------------------------------------- prompts


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


def template_lines(spec: str | list[str]) -> list[str]:
    """Template lines from a built-in name ("subject_filewords"), a .txt file, one inline line containing
    [name]/[filewords], or a TOML list of lines. Blank lines are dropped. ValueError says what is wrong."""
    if isinstance(spec, list):
        lines = [str(line).strip() for line in spec]
    else:
        text = spec.strip()
        builtin = TEMPLATE_DIR / f"{text.removesuffix('.txt')}.txt"
        if text and not re.search(r"[/\\]", text) and builtin.is_file():
            path = builtin
        else:
            path = Path(text).expanduser()
        if text and path.is_file():
            try:
                lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
            except UnicodeDecodeError:
                raise ValueError(f"embedding.template: {path} is not UTF-8 text; re-save it as UTF-8") from None
        elif "[" in text:
            lines = [text]
        else:
            raise ValueError(f"embedding.template {spec!r} is neither a built-in template "
                             f"({', '.join(builtin_templates())}), an existing .txt file, nor a template line "
                             "such as \"[name], [filewords]\"")
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"embedding.template {spec!r} has no lines")
    return lines


def template_problem(spec: str | list[str]) -> str | None:
    try:
        template_lines(spec)
    except (ValueError, OSError) as err:
        return str(err)
    return None


def filename_words(path: Path) -> str:
    """A1111's caption for an image without a caption file: its file name minus a leading number/hyphens."""
    return _LEADING_NUMBERS.sub("", Path(path).stem)


def fill_template(line: str, name: str, filewords: str) -> str:
    """A1111's order: [filewords] first, then [name]."""
    return line.replace("[filewords]", filewords).replace("[name]", name)


@dataclass(frozen=True)
class WeightedBatch(Batch):
    """A batch that carries a per-pixel loss weight map [B, 1, h, w] at latent resolution."""

    loss_weight: torch.Tensor | None = None


class PromptedData:
    """The run's TrainingData with A1111's prompts: per sample a seeded random template line, with [name] (the
    embedding's tokens) and [filewords] (the caption file, else the file name; tags shuffled/dropped as set)
    filled in; with alpha weights, a loss weight map per image. Batching, sizes and pixels are the wrapped
    TrainingData's (attribute lookups fall through to it)."""

    def __init__(self, base: TrainingData, lines: list[str], name: str, vectors: int, options: CaptionOptions,
                 alpha_weight: bool = False, latent_factor: int = 8):
        self.base = base
        self.lines = lines
        self.name = name
        self.vectors = vectors
        self.options = options
        self.alpha_weight = alpha_weight
        self.latent_factor = latent_factor
        self.filewords = [item.caption if item.caption_from_file else filename_words(item.path)
                          for item in base.items]
        self._weights: dict[tuple[int, bool], torch.Tensor] = {}

    def __getattr__(self, attr: str):
        if attr == "base":  # not set yet: avoid recursing through __getattr__
            raise AttributeError(attr)
        return getattr(self.base, attr)

    def prompt(self, index: int, rng) -> str:
        filewords = process_caption(self.filewords[index], self.options, rng)
        text = fill_template(rng.choice(self.lines), self.name, filewords)
        return expand_name(text, self.name, self.vectors)

    def batch(self, epoch: int, positions: list[int]) -> WeightedBatch:
        base = self.base.batch(epoch, positions)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        fields["captions"] = [self.prompt(index, derived_rng(self.base.seed, epoch, position, 6))
                              for position, index in zip(positions, base.item_indices)]
        weight = None
        if self.alpha_weight:
            weight = torch.stack([self.loss_weight(i, f) for i, f in zip(base.item_indices, base.flips)])
        return WeightedBatch(**fields, loss_weight=weight)

    def loss_weight(self, index: int, flip: bool) -> torch.Tensor:
        """[1, h, w] at latent resolution from the image's alpha, scaled to minimum 0 and mean 1 as A1111
        does (so the loss keeps its usual size); ones for images without alpha or with uniform alpha."""
        key = (index, flip)
        if key not in self._weights:
            width, height = self.size_of(index)
            size = (width // self.latent_factor, height // self.latent_factor)
            alpha = load_alpha(self.items[index].path)
            weight = torch.ones(1, size[1], size[0])
            if alpha is not None:
                alpha = resize_and_crop(alpha, width, height)  # the crop the image gets
                alpha = ImageOps.mirror(alpha) if flip else alpha
                values = np.asarray(alpha.resize(size, Image.Resampling.BOX), dtype=np.float32)
                values = torch.from_numpy(values.copy()).unsqueeze(0)
                values -= values.min()
                if values.mean() > 0:
                    weight = values / values.mean()
            self._weights[key] = weight
        return self._weights[key]

    def name_reaches_prompts(self) -> bool:
        """False when no template line has [name] and no caption mentions the name: nothing would train."""
        if any("[name]" in line for line in self.lines):
            return True
        word = re.compile(rf"(?<![\w-]){re.escape(self.name)}(?![\w-])", re.IGNORECASE)
        return any("[name]" in text or word.search(text) for text in self.filewords)


# ---------------------------------------------------------------------------------------------- latents


class SampledLatents:
    """Latents with A1111's sampling methods over the VAE's latent distribution: "once" draws one sample per
    image and keeps it (what the other trainers do), "deterministic" takes the mean (A1111 sets std to 0),
    "random" draws a new sample every step. Distributions are encoded once (dataset.cache_latents = "memory"),
    read from the shared disk cache ("disk") or encoded every step ("off", e.g. for random crops); the draws are seeded, so a resumed run sees the same ones."""

    def __init__(self, data, vae, method: str, cache: str, seed: int):
        self.data = data
        self.vae = vae
        self.method = method
        self.seed = seed
        self.disk = cache == "disk"
        self.cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None if cache == "off" else {}

    def fill(self) -> None:
        if self.cache is None:
            return
        if self.disk:  # the shared disk cache keeps distributions: read them, encode only what is missing
            source = LatentSource(self.data, self.vae, "disk", self.seed)
            source.fill()
            self.cache = {key: source.distribution(key) for key in source.keys()}
            return
        flips = (False, True) if self.data.flip_aug else (False,)
        keys = [(i, f) for i in range(len(self.data.items)) for f in flips]
        with torch.no_grad():
            for index, flip in tqdm(keys, desc="caching latents", unit="img", leave=False):
                mean, std = encode_distribution(self.vae, self.data.pixels(index, flip).unsqueeze(0))
                self.cache[(index, flip)] = (mean[0], std[0])

    def latents(self, batch: Batch, epoch: int, step_seed: int) -> torch.Tensor:
        keys = list(zip(batch.item_indices, batch.flips))
        if self.cache is not None:
            distributions = [self.cache[key] for key in keys]
        else:
            rng = derived_rng(step_seed, 4)
            with torch.no_grad():
                mean, std = encode_distribution(self.vae, torch.stack([self.data.pixels(i, f, rng) for i, f in keys]))
            distributions = list(zip(mean, std))
        return torch.stack([self._draw(key, mean, std, hash_ints(step_seed, position, 7))
                            for position, (key, (mean, std)) in enumerate(zip(keys, distributions))])

    def _draw(self, key: tuple[int, bool], mean: torch.Tensor, std: torch.Tensor, step_draw: int) -> torch.Tensor:
        scale = self.vae.config.scaling_factor
        if self.method == "deterministic":
            return (mean * scale).float()
        # "once" uses the seed the shared latent cache uses, so it gives the same latents as other trainers
        seed = hash_ints(self.seed, key[0], int(key[1]), 3) if self.method == "once" else step_draw
        return sample_latent(mean, std, seed, scale)


# ---------------------------------------------------------------------------------------------- trainable


class EmbeddingTrainable:
    """The embedding's vectors [n, dim] are the only trained tensor.

    The text encoder's embedding matrix is never a parameter: a forward hook on get_input_embeddings() puts
    these vectors in place of the new tokens' rows. So no other row can move (no gradient, weight decay or
    optimizer state ever touches the matrix), and the optimizer state has A1111's shape (one [n, dim]
    tensor), which keeps `.optim` files interchangeable with A1111's."""

    trains_text_encoder = True  # gradients flow through the frozen text encoder into the vectors

    def __init__(self, parts: ModelParts, name: str, vectors: torch.Tensor, token_ids: list[int], lr: float,
                 file_format: str = "pt", save_dtype: torch.dtype = torch.float32):
        self.parts = parts
        self.name = name
        self.token_ids = list(token_ids)
        self.lr = lr
        self.artifact_suffix = f".{file_format}"
        self.save_dtype = save_dtype
        self.checkpoint_name = Path(parts.source).stem if parts.source else None
        self.vec = torch.nn.Parameter(vectors.detach().clone().float())
        for module in (parts.unet, parts.text_encoder, parts.vae):
            module.requires_grad_(False)
        layer = parts.text_encoder.get_input_embeddings()
        self._rows = torch.full((layer.num_embeddings,), -1, dtype=torch.long)
        self._rows[self.token_ids] = torch.arange(len(self.token_ids))
        self._handle = layer.register_forward_hook(self._substitute)
        self.sync_rows()

    def _substitute(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        rows = self._rows.to(inputs[0].device)[inputs[0]]
        vectors = self.vec.to(output.device, output.dtype)[rows.clamp(min=0)]
        return torch.where((rows >= 0).unsqueeze(-1), vectors, output)

    def sync_rows(self) -> None:
        """Copy the vectors into the matrix rows, so the text encoder holds them even without the hook."""
        weight = self.parts.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.token_ids] = self.vec.detach().to(weight.device, weight.dtype)

    def remove(self) -> None:
        """Detach the hook (the rows keep the last synced vectors)."""
        self.sync_rows()
        self._handle.remove()

    def param_groups(self) -> list[dict]:
        return [{"params": [self.vec], "lr": self.lr, "name": "embedding"}]

    def set_train(self, training: bool) -> None:
        pass  # nothing trained has dropout; the frozen models stay in eval mode, as in A1111

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"emb_params": self.vec.detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vec.copy_(state["emb_params"].to(self.vec.device, self.vec.dtype))
        self.sync_rows()

    def after_backward(self) -> None:
        pass  # other rows are not parameters, so there are no gradients to mask

    def embedding(self, name: str, step: int) -> Embedding:
        """The vectors as saved (in the save precision, back in fp32), so checksums match the file."""
        vectors = self.vec.detach().cpu().to(self.save_dtype).float()
        return Embedding(name, vectors, step, None, self.checkpoint_name)

    def save(self, path: Path, progress: Progress) -> None:
        self.sync_rows()
        save_embedding(self.embedding(path.stem, progress.global_step), path, self.save_dtype)


# ---------------------------------------------------------------------------------------------- A1111 log folder


@dataclass
class ResumePoint:
    path: Path
    embedding: Embedding
    step: int


class A1111Log(TrainerHooks):
    """A1111's log layout under <logging.log_dir>/<YYYY-MM-DD>/<name>/: embeddings/<name>-<step>.pt (+ .optim),
    images/<name>-<step>.png, image_embeddings/<name>-<step>.png and textual_inversion_loss.csv. <step> is
    the number of optimizer steps done. Also: resume from an embedding file + .optim, A1111 LR schedules and
    the latent sampling method."""

    def __init__(self, config: TIRunConfig, trainable: EmbeddingTrainable, data: PromptedData, plan: TrainingPlan,
                 schedule: A1111Schedule | None, resume: ResumePoint | None):
        self.config = config
        self.trainable = trainable
        self.data = data
        self.plan = plan
        self.schedule = schedule
        self.resume = resume
        self.name = config.embedding.name
        self.folder = Path(config.logging.log_dir) / datetime.date.today().isoformat() / self.name
        self.optimizer_name = canonical_optimizer_name(config.optimizer.name)

    # -- set-up
    def configure(self, trainer: Trainer, loop: LoopParts) -> None:
        start = self.resume.step if self.resume else 0
        if self.resume:
            state, message = load_optimizer_state(self.resume.path, self.resume.embedding.vectors, self.optimizer_name)
            print(message)
            if state is not None:
                loop.optimizer.load_state_dict(state)
                for group in loop.optimizer.param_groups:
                    group["name"] = "embedding"  # A1111's state has no group names
            per_epoch = self.plan.steps_per_epoch
            trainer.progress = Progress(start, start // per_epoch,
                                        (start % per_epoch) * self.plan.accumulation)
        if self.schedule is not None:
            schedule = A1111Schedule(self.schedule.text, self.plan.total_steps, start)
            loop.scheduler = a1111_lambda_scheduler(loop.optimizer, schedule)
        elif start:
            loop.scheduler.last_epoch = start - 1  # continue the named schedule where the embedding left it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
                loop.scheduler.step()
        dataset = self.config.dataset
        loop.latents = SampledLatents(self.data, loop.latents.vae, self.config.embedding.latent_sampling_method,
                                      dataset.cache_latents, self.config.train.seed)

    # -- every step
    def after_step(self, trainer: Trainer, loop: LoopParts, loss: float, lrs: dict[str, float], batch: Batch) -> None:
        step, log = trainer.progress.global_step, self.config.ti_log
        if log.write_csv_every and step % log.write_csv_every == 0:
            self.write_csv(step, loss, next(iter(lrs.values())))
        if log.save_embedding_every and step % log.save_embedding_every == 0:
            self.save_copy(step, loop)
        if log.create_image_every and step % log.create_image_every == 0:
            self.preview(step, batch)

    def after_train(self, trainer: Trainer, loop: LoopParts, final: Path) -> None:
        self.trainable.sync_rows()
        if self.config.embedding.save_optimizer_state:
            vectors = self.trainable.embedding(self.name, trainer.progress.global_step).vectors
            save_optimizer_state(final, vectors, loop.optimizer.state_dict(), self.optimizer_name)

    def write_csv(self, step: int, loss: float, lr: float) -> None:
        """One row of A1111's loss CSV. Appended (not rewritten) so a resumed run continues the file."""
        path = self.folder / CSV_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        per_epoch = self.plan.steps_per_epoch
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "epoch", "epoch_step", "loss", "learn_rate"])
            writer.writerow([step, (step - 1) // per_epoch, (step - 1) % per_epoch, f"{loss:.7f}", lr])

    def save_copy(self, step: int, loop: LoopParts) -> Path:
        name = f"{self.name}-{step}"
        path = self.folder / "embeddings" / f"{name}.pt"
        embedding = self.trainable.embedding(name, step)
        save_embedding(embedding, path, self.trainable.save_dtype)
        if self.config.embedding.save_optimizer_state:
            save_optimizer_state(path, embedding.vectors, loop.optimizer.state_dict(), self.optimizer_name)
        return path

    def preview_spec(self, step: int, batch: Batch) -> SampleSpec:
        log, train = self.config.ti_log, self.config.train
        vectors = self.config.embedding.vectors
        prompt = expand_name(log.preview_prompt, self.name, vectors) if log.preview_prompt else batch.captions[0]
        seed = log.preview_seed if log.preview_seed >= 0 else hash_ints(train.seed, step, 8) % 2**32
        size = self.config.dataset.resolution
        return SampleSpec(prompt, expand_name(log.preview_negative_prompt, self.name, vectors),
                          log.preview_width or size, log.preview_height or size, log.preview_steps,
                          log.preview_cfg_scale, seed)

    def preview(self, step: int, batch: Batch) -> None:
        spec = self.preview_spec(step, batch)
        image = generate(self.trainable.parts, spec, self.config.model.clip_skip)
        name = f"{self.name}-{step}"
        save_png(image, self.folder / "images" / f"{name}.png", parameters=spec.infotext())
        if self.config.ti_log.save_image_with_stored_embedding:
            save_png(image, self.folder / "image_embeddings" / f"{name}.png",
                     embedding=self.trainable.embedding(name, step), parameters=spec.infotext())


# ---------------------------------------------------------------------------------------------- set-up


@dataclass
class TISetup:
    trainable: EmbeddingTrainable
    data: PromptedData
    plan: TrainingPlan
    hooks: A1111Log
    lines: list[str]

    def describe(self) -> str:
        return "\n".join(self.lines + [f"A1111 log folder: {self.hooks.folder}"])


def _resume_point(config: TIRunConfig, dim: int) -> ResumePoint | None:
    emb = config.embedding
    if not emb.resume:
        return None
    embedding = load_embedding(emb.resume)
    expected = (emb.vectors, dim)
    if tuple(embedding.vectors.shape) != expected:
        raise EmbeddingError(f"embedding.resume: {emb.resume} holds vectors of shape {tuple(embedding.vectors.shape)}"
                             f", but this run trains {expected[0]} vector(s) of width {dim} for this model; set "
                             f"embedding.vectors = {embedding.vectors.shape[0]} or pick the matching model")
    step = embedding.step or 0
    if embedding.step is None:
        print(f"note: {emb.resume} does not record its step; continuing from step 0")
    return ResumePoint(Path(emb.resume), embedding, step)


def _schedule_and_plan(config: TIRunConfig, plan: TrainingPlan, notes: list[str]
                       ) -> tuple[A1111Schedule | None, TrainingPlan]:
    text = config.embedding.learn_rate
    if not text.strip():
        return None, plan
    schedule = A1111Schedule(text, plan.total_steps)
    if schedule.last_step < plan.total_steps:
        # A1111 stops where the schedule's last explicit step ends
        total = schedule.last_step
        notes.append(f"learning-rate schedule ends at step {total}, before the planned {plan.total_steps}: "
                     f"training stops there")
        plan = dataclasses.replace(plan, total_steps=total, epochs=math.ceil(total / plan.steps_per_epoch))
    if schedule.ignored:
        notes.append(f"learning-rate schedule entries after the last step are ignored: {', '.join(schedule.ignored)}")
    return schedule, plan


def prepare_embedding_training(config: TIRunConfig, parts: ModelParts, data: TrainingData,
                               plan: TrainingPlan) -> TISetup | None:
    """Tokens, starting vectors, prompts and hooks for a run; None (after saying why) when a resumed
    embedding is already at or beyond the run's last step."""
    emb, ds = config.embedding, config.dataset
    dim = parts.text_encoder.get_input_embeddings().weight.shape[1]
    resume = _resume_point(config, dim)
    notes: list[str] = []
    schedule, plan = _schedule_and_plan(config, plan, notes)
    start = resume.step if resume else 0
    if start >= plan.total_steps:
        print(f"{emb.resume} was already trained for {start} steps, at or beyond this run's {plan.total_steps}: "
              "nothing to train; raise train.max_steps (or the schedule's last step) to continue")
        return None
    if resume:
        vectors, origin = resume.embedding.vectors, f"{emb.resume} (step {start})"
    else:
        vectors, origin = init_vectors(parts.tokenizer, parts.text_encoder, emb.init_text, emb.vectors)
    ids = add_tokens(parts.tokenizer, parts.text_encoder, emb.name, emb.vectors)
    lr = schedule.rate_at(start) if schedule else config.optimizer.lr
    trainable = EmbeddingTrainable(parts, emb.name, vectors, ids, lr, emb.format, SAVE_DTYPES[config.save.precision])
    lines = template_lines(emb.template)
    options = CaptionOptions(ds.caption_prefix, ds.caption_suffix, emb.shuffle_tags, ds.keep_tokens,
                             ds.caption_dropout_rate, emb.tag_dropout)
    latent_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    prompted = PromptedData(data, lines, emb.name, emb.vectors, options, emb.use_alpha_weight, latent_factor)
    if not prompted.name_reaches_prompts():
        raise EmbeddingError(f"no training prompt contains the embedding: no line of embedding.template has [name] "
                             f"and no caption mentions {emb.name!r}; use a template with [name], such as "
                             "subject_filewords or \"[name], [filewords]\"")
    hooks = A1111Log(config, trainable, prompted, plan, schedule, resume)
    tokens = " ".join(token_names(emb.name, emb.vectors))
    rate = f"A1111 schedule {emb.learn_rate!r}" if schedule else f"{config.optimizer.lr:g} ({config.optimizer.scheduler})"
    lines_out = [
        f"embedding: {emb.name!r}, {emb.vectors} vector(s) x {dim} = {emb.vectors * dim:,} trained values; "
        f"prompts use the tokens: {tokens}",
        f"start: {origin}",
        f"template: {len(lines)} line(s), e.g. {lines[0]!r}; latent sampling: {emb.latent_sampling_method}"
        + ("; PNG alpha weighs the loss" if emb.use_alpha_weight else ""),
        f"learning rate: {rate}",
    ] + [f"note: {n}" for n in notes]
    if config.save.name != emb.name:
        lines_out.append(f"note: files are named {config.save.name!r}; A1111 takes the trigger word from the file "
                         f"name, so there the trigger is {config.save.name!r}, not {emb.name!r}")
    return TISetup(trainable, prompted, plan, hooks, lines_out)
