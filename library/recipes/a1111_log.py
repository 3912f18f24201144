"""A1111's log folder for textual inversion, as trainer hooks: embedding copies with their optimizer state,
preview images (plain and with the embedding in a PNG chunk) and the loss CSV."""
from __future__ import annotations

import csv
import datetime
import json
from pathlib import Path

from library.atomic import write_text_atomically
from library.data.batches import Batch, hash_ints
from library.networks.embedding_names import expand_name
from library.networks.embedding_trainable import EmbeddingTrainable
from library.networks.embeddings import save_embedding, save_optimizer_state, save_png
from library.networks.image_embed import caption_overlay, embed_in_pixels
from library.sampling.prompt_file import SampleSpec
from library.sampling.preview import generate
from library.training.hooks import TrainerHooks
from library.registry import canonical_optimizer_name
from library.training.plan import TrainingPlan
from library.training.trainer import LoopParts, Trainer

CSV_NAME = "textual_inversion_loss.csv"


class A1111Log(TrainerHooks):
    """A1111's log layout under <logging.log_dir>/<YYYY-MM-DD>/<name>/: embeddings/<name>-<step>.pt (+ .optim),
    images/<name>-<step>.png, image_embeddings/<name>-<step>.png and textual_inversion_loss.csv. <step> is
    the number of optimizer steps done."""

    writes_outputs = True  # data-parallel: the main process alone writes them

    def __init__(self, config, trainable: EmbeddingTrainable, plan: TrainingPlan):
        self.config = config
        self.trainable = trainable
        self.plan = plan
        self.name = config.embedding.name
        self.folder = Path(config.logging.log_dir) / datetime.date.today().isoformat() / self.name
        self.optimizer_name = canonical_optimizer_name(config.optimizer.name)

    # -- every step
    def after_step(self, trainer: Trainer, loop: LoopParts, loss: float, lrs: dict[str, float], batch: Batch) -> None:
        step, log = trainer.progress.global_step, self.config.ti_log
        if log.write_csv_every and step % log.write_csv_every == 0:
            self.write_csv(step, loss, next(iter(lrs.values())))
        if log.save_embedding_every and step % log.save_embedding_every == 0:
            self.save_copy(step, loop)
        if log.create_image_every and step % log.create_image_every == 0:
            self.preview(step, batch)

    def after_save(self, trainer: Trainer, loop: LoopParts, artifact: Path) -> None:
        """`<embedding>.optim` beside every saved embedding (intermediate, interrupted, final), so A1111's way of
        resuming — from the embedding and its .optim — continues exactly from any of them."""
        if self.config.embedding.save_optimizer_state:
            vectors = self.trainable.embedding(self.name, trainer.progress.global_step).vectors
            save_optimizer_state(artifact, vectors, loop.optimizer.state_dict(), self.optimizer_name)

    def after_train(self, trainer: Trainer, loop: LoopParts, final: Path) -> None:
        self.trainable.sync_rows()

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
            # epoch counts from 0 and epoch_step from 1 within it, as in A1111's CSVs
            writer.writerow([step, (step - 1) // per_epoch, (step - 1) % per_epoch + 1, f"{loss:.7f}", lr])

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
        image = generate(self.trainable.parts, spec, self.config.model.clip_skip, self.config.train.max_token_length)
        name = f"{self.name}-{step}"
        save_png(image, self.folder / "images" / f"{name}.png", parameters=spec.infotext())
        if self.config.ti_log.save_image_with_stored_embedding:
            embedding = self.trainable.embedding(name, step)
            trainable = self.trainable
            captioned = caption_overlay(image, f"<{self.name}>", trainable.checkpoint_name or "",
                                        f"[{trainable.checkpoint_hash or ''}]", f"{len(embedding.vectors)}v {step}s")
            save_png(embed_in_pixels(captioned, embedding.a1111_dict()),
                     self.folder / "image_embeddings" / f"{name}.png", embedding=embedding, parameters=spec.infotext())

    def before_train(self, trainer: Trainer, loop: LoopParts) -> None:
        """A1111's "settings at start" file, settings-<date>_<time>.json, with A1111's keys."""
        config, plan, emb, log = self.config, trainer.plan, self.config.embedding, self.config.ti_log
        now = datetime.datetime.now()
        settings = {
            "datetime": now.strftime("%Y-%m-%d %H:%M:%S"), "model_name": self.trainable.checkpoint_name,
            "model_hash": self.trainable.checkpoint_hash, "initial_step": trainer.progress.global_step,
            "num_of_dataset_images": len(trainer.data.items), "learn_rate": emb.learn_rate or str(config.optimizer.lr),
            "batch_size": config.train.batch_size, "gradient_step": config.train.gradient_accumulation_steps,
            "clip_grad_mode": "norm" if config.optimizer.max_grad_norm else None,
            "clip_grad_value": config.optimizer.max_grad_norm or None, "data_root": config.dataset.train_dir,
            "log_directory": str(self.folder), "training_width": config.dataset.resolution,
            "training_height": config.dataset.resolution, "steps": plan.total_steps,
            "create_image_every": log.create_image_every, "template_file": str(emb.template),
            "latent_sampling_method": emb.latent_sampling_method, "embedding_name": self.name,
            "num_vectors_per_token": emb.vectors, "save_embedding_every": log.save_embedding_every,
            "save_image_with_stored_embedding": log.save_image_with_stored_embedding}
        path = self.folder / f"settings-{now.strftime('%Y-%m-%d_%H-%M-%S')}.json"
        write_text_atomically(path, json.dumps(settings, indent=2) + "\n")
        print(f"training settings: {path}")
