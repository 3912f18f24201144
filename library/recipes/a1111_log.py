"""A1111's log folder for textual inversion, as trainer hooks: embedding copies with their optimizer state,
preview images (plain and with the embedding in a PNG chunk) and the loss CSV."""
from __future__ import annotations

import csv
import datetime
from pathlib import Path

from library.data.batches import Batch, hash_ints
from library.networks.embedding_names import expand_name
from library.networks.embedding_trainable import EmbeddingTrainable
from library.networks.embeddings import save_embedding, save_optimizer_state, save_png
from library.sampling.preview import SampleSpec, generate
from library.training.hooks import TrainerHooks
from library.training.optimizers import canonical_optimizer_name
from library.training.plan import TrainingPlan
from library.training.trainer import LoopParts, Trainer

CSV_NAME = "textual_inversion_loss.csv"


class A1111Log(TrainerHooks):
    """A1111's log layout under <logging.log_dir>/<YYYY-MM-DD>/<name>/: embeddings/<name>-<step>.pt (+ .optim;
    .safetensors for SDXL, which .pt cannot hold), images/<name>-<step>.png, image_embeddings/<name>-<step>.png
    and textual_inversion_loss.csv. <step> is the number of optimizer steps done."""

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

    def after_train(self, trainer: Trainer, loop: LoopParts, final: Path) -> None:
        self.trainable.sync_rows()
        if self.config.embedding.save_optimizer_state:
            vectors = self.trainable.embedding(self.name, trainer.progress.global_step).checksum_values()
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
        path = self.folder / "embeddings" / f"{name}{self.trainable.copy_suffix}"
        embedding = self.trainable.embedding(name, step)
        save_embedding(embedding, path, self.trainable.save_dtype)
        if self.config.embedding.save_optimizer_state:
            save_optimizer_state(path, embedding.checksum_values(), loop.optimizer.state_dict(), self.optimizer_name)
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
