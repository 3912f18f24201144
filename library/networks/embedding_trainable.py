"""Textual inversion's trained tensors: new token vectors, one set per text encoder (SDXL has two), put in
place by forward hooks (a `Trainable`)."""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.parts import ModelParts
from library.networks.embeddings import Embedding, save_embedding
from library.training.checkpoints import Progress


class EmbeddingTrainable:
    """The embedding's vectors, [n, dim] per text encoder, are the only trained tensors.

    No text encoder's embedding matrix is ever a parameter: a forward hook on each get_input_embeddings() puts
    the vectors in place of the new tokens' rows. So no other row can move (no gradient, weight decay or
    optimizer state ever touches a matrix), and with one text encoder the optimizer state has A1111's shape
    (one [n, dim] tensor), which keeps `.optim` files interchangeable with A1111's. Vectors are kept by their
    file key (TextEncoderSlot.embedding_key: "emb_params", or SDXL's "clip_l" and "clip_g")."""

    trains_text_encoder = True  # gradients flow through the frozen text encoders into the vectors
    saves_base_model = False

    def __init__(self, parts: ModelParts, name: str, vectors: torch.Tensor | list[torch.Tensor], token_ids: list[int],
                 lr: float, file_format: str = "pt", save_dtype: torch.dtype = torch.float32,
                 checkpoint_hash: str | None = None):
        vectors = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
        if len(vectors) != len(parts.text_encoders):
            raise ValueError(f"{len(vectors)} vector sets for {len(parts.text_encoders)} text encoders")
        self.parts = parts
        self.name = name
        self.token_ids = list(token_ids)
        self.lr = lr
        self.keys = [slot.embedding_key for slot in parts.family.text_encoders]
        self.artifact_suffix = f".{file_format}"
        # A1111's log folder keeps .pt copies; a two-encoder embedding has no .pt form
        self.copy_suffix = ".pt" if len(vectors) == 1 else ".safetensors"
        self.save_dtype = save_dtype
        self.checkpoint_name = Path(parts.source).stem if parts.source else None
        self.checkpoint_hash = checkpoint_hash  # A1111's short hash of the model file (its sd_checkpoint)
        self.vecs = [torch.nn.Parameter(v.detach().clone().float()) for v in vectors]
        self.vec = self.vecs[0]
        for module in parts.networks():
            module.requires_grad_(False)
        self._rows, self._handles = [], []
        for index, encoder in enumerate(parts.text_encoders):
            layer = encoder.get_input_embeddings()
            rows = torch.full((layer.num_embeddings,), -1, dtype=torch.long)
            rows[self.token_ids] = torch.arange(len(self.token_ids))
            self._rows.append(rows)
            self._handles.append(layer.register_forward_hook(self._substitute_for(index)))
        self.sync_rows()

    def _substitute_for(self, index: int):
        def substitute(module, inputs, output: torch.Tensor) -> torch.Tensor:
            rows = self._rows[index].to(inputs[0].device)[inputs[0]]
            vectors = self.vecs[index].to(output.device, output.dtype)[rows.clamp(min=0)]
            return torch.where((rows >= 0).unsqueeze(-1), vectors, output)

        return substitute

    def sync_rows(self) -> None:
        """Copy the vectors into the matrix rows, so the text encoders hold them even without the hooks."""
        for encoder, vec in zip(self.parts.text_encoders, self.vecs):
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[self.token_ids] = vec.detach().to(weight.device, weight.dtype)

    def remove(self) -> None:
        """Detach the hooks (the rows keep the last synced vectors)."""
        self.sync_rows()
        for handle in self._handles:
            handle.remove()

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.vecs), "lr": self.lr, "name": "embedding"}]

    def set_train(self, training: bool) -> None:
        pass  # nothing trained has dropout; the frozen models stay in eval mode, as in A1111

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: vec.detach().clone() for key, vec in zip(self.keys, self.vecs)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, vec in zip(self.keys, self.vecs):
                vec.copy_(state[key].to(vec.device, vec.dtype))
        self.sync_rows()

    def after_backward(self) -> None:
        pass  # other rows are not parameters, so there are no gradients to mask

    def embedding(self, name: str, step: int) -> Embedding:
        """The vectors as saved (in the save precision, back in fp32), so checksums match the file."""
        saved = {key: vec.detach().cpu().to(self.save_dtype).float() for key, vec in zip(self.keys, self.vecs)}
        embedding = Embedding.of_encoders(name, saved, step, self.checkpoint_name)
        embedding.sd_checkpoint = self.checkpoint_hash
        return embedding

    def save(self, path: Path, progress: Progress) -> None:
        self.sync_rows()
        save_embedding(self.embedding(path.stem, progress.global_step), path, self.save_dtype)
