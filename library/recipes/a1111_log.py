"""A1111's log folder for textual inversion, as trainer hooks: embedding copies with their optimizer state,
preview images (plain and with the embedding in a PNG chunk) and the loss CSV (the shared part: a1111_folder.py)."""
from __future__ import annotations

from pathlib import Path

from library.data.batches import Batch
from library.networks.embedding_names import expand_name
from library.networks.embedding_trainable import EmbeddingTrainable
from library.networks.embeddings import save_embedding, save_optimizer_state, save_png
from library.networks.image_embed import caption_overlay, embed_in_pixels
from library.recipes.a1111_folder import A1111LogFolder
from library.training.plan import TrainingPlan
from library.training.trainer import LoopParts, Trainer

CSV_NAME = "textual_inversion_loss.csv"


class A1111Log(A1111LogFolder):
    """A1111's log layout under <logging.log_dir>/<YYYY-MM-DD>/<name>/: embeddings/<name>-<step>.pt (+ .optim;
    .safetensors for SDXL, which .pt cannot hold), images/<name>-<step>.png, image_embeddings/<name>-<step>.png
    and textual_inversion_loss.csv. <step> is the number of optimizer steps done."""

    csv_name = CSV_NAME
    copy_every_key = "save_embedding_every"


    def __init__(self, config, trainable: EmbeddingTrainable, plan: TrainingPlan):
        emb = config.embedding
        super().__init__(config, emb.name, emb, config.ti_log, plan, trainable,
                         lambda text: expand_name(text, emb.name, emb.vectors))

    def after_save(self, trainer: Trainer, loop: LoopParts, artifact: Path) -> None:
        """`<embedding>.optim` beside every saved embedding (intermediate, interrupted, final), so A1111's way of
        resuming — from the embedding and its .optim — continues exactly from any of them."""
        if self.config.embedding.save_optimizer_state:
            vectors = self.trainable.embedding(self.name, trainer.progress.global_step).checksum_values()
            save_optimizer_state(artifact, vectors, loop.optimizer.state_dict(), self.optimizer_name)

    def after_train(self, trainer: Trainer, loop: LoopParts, final: Path) -> None:
        self.trainable.sync_rows()

    def save_copy(self, step: int, loop: LoopParts) -> Path:
        name = f"{self.name}-{step}"
        path = self.folder / "embeddings" / f"{name}{self.trainable.copy_suffix}"
        embedding = self.trainable.embedding(name, step)
        save_embedding(embedding, path, self.trainable.save_dtype)
        if self.config.embedding.save_optimizer_state:
            save_optimizer_state(path, embedding.checksum_values(), loop.optimizer.state_dict(), self.optimizer_name)
        return path

    def preview(self, step: int, batch: Batch) -> None:
        image, spec = self.render_preview(step, batch)
        name = f"{self.name}-{step}"
        if self.config.ti_log.save_image_with_stored_embedding:
            embedding = self.trainable.embedding(name, step)
            trainable = self.trainable
            captioned = caption_overlay(image, f"<{self.name}>", trainable.checkpoint_name or "",
                                        f"[{trainable.checkpoint_hash or ''}]", f"{len(embedding.vectors)}v {step}s")
            save_png(embed_in_pixels(captioned, embedding.a1111_dict()),
                     self.folder / "image_embeddings" / f"{name}.png", embedding=embedding, parameters=spec.infotext())

    def settings(self, trainer: Trainer) -> dict:
        emb, log = self.config.embedding, self.config.ti_log
        return {**super().settings(trainer), "embedding_name": self.name, "num_vectors_per_token": emb.vectors,
                "save_embedding_every": log.save_embedding_every,
                "save_image_with_stored_embedding": log.save_image_with_stored_embedding}
