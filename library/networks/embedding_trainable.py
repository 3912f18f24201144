"""Textual inversion's trained tensor: new token vectors put in place by a forward hook (a `Trainable`)."""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.parts import ModelParts
from library.networks.embeddings import Embedding, save_embedding
from library.training.checkpoints import Progress


class EmbeddingTrainable:
    """The embedding's vectors [n, dim] are the only trained tensor.

    The text encoder's embedding matrix is never a parameter: a forward hook on get_input_embeddings() puts
    these vectors in place of the new tokens' rows. So no other row can move (no gradient, weight decay or
    optimizer state ever touches the matrix), and the optimizer state has A1111's shape (one [n, dim]
    tensor), which keeps `.optim` files interchangeable with A1111's."""

    trains_text_encoder = True  # gradients flow through the frozen text encoder into the vectors
    saves_base_model = False

    def __init__(self, parts: ModelParts, name: str, vectors: torch.Tensor, token_ids: list[int], lr: float,
                 file_format: str = "pt", save_dtype: torch.dtype = torch.float32, checkpoint_hash: str | None = None):
        self.parts = parts
        self.name = name
        self.token_ids = list(token_ids)
        self.lr = lr
        self.artifact_suffix = f".{file_format}"
        self.save_dtype = save_dtype
        self.checkpoint_name = Path(parts.source).stem if parts.source else None
        self.checkpoint_hash = checkpoint_hash  # A1111's short hash of the model file (its sd_checkpoint)
        self.vec = torch.nn.Parameter(vectors.detach().clone().float())
        for module in parts.networks():
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
        return Embedding(name, vectors, step, self.checkpoint_hash, self.checkpoint_name)

    def save(self, path: Path, progress: Progress) -> None:
        self.sync_rows()
        save_embedding(self.embedding(path.stem, progress.global_step), path, self.save_dtype)
