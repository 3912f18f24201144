"""Embedding fine-tuning's `Trainable`: chosen existing rows of the text encoder's token-embedding table (or all
of them) trained in place of the originals, through a forward hook."""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.parts import ModelParts
from library.networks.token_rows import save_token_rows, token_rows_metadata
from library.training.checkpoints import Progress
from library.training.hooks import TrainerHooks


class TokenRowsTrainable:
    """The chosen rows [n, width] are the only trained tensor.

    As for textual inversion (embedding_trainable.py), the table itself is never a parameter: a forward hook on
    get_input_embeddings() puts the trained rows in place of the chosen tokens' rows, so no other row can move
    (no gradient, weight decay or optimizer state ever touches the table). Written separately from textual
    inversion's hook because that one adds new tokens and saves an embedding file."""

    artifact_suffix = ".safetensors"
    trains_text_encoder = True  # gradients flow through the frozen text encoder into the rows
    saves_base_model = False

    def __init__(self, parts: ModelParts, token_ids: list[int] | None, words: list[str], tokens: list[str], lr: float,
                 save_dtype: torch.dtype = torch.float32, checkpoint_hash: str | None = None):
        self.parts = parts
        self.words = words
        self.tokens = tokens
        self.lr = lr
        self.save_dtype = save_dtype
        self.checkpoint_hash = checkpoint_hash
        layer = parts.text_encoder.get_input_embeddings()
        size = layer.num_embeddings
        self.ids = torch.arange(size) if token_ids is None else torch.tensor(token_ids, dtype=torch.long)
        self.whole_table = token_ids is None
        self.base_rows = layer.weight.detach()[self.ids].float().cpu().clone()
        self.rows = torch.nn.Parameter(self.base_rows.clone())
        for module in parts.networks():
            module.requires_grad_(False)
        self._index = torch.full((size,), -1, dtype=torch.long)
        self._index[self.ids] = torch.arange(len(self.ids))
        self._handle = layer.register_forward_hook(self._substitute)

    def _substitute(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        index = self._index.to(inputs[0].device)[inputs[0]]
        rows = self.rows.to(output.device, output.dtype)[index.clamp(min=0)]
        return torch.where((index >= 0).unsqueeze(-1), rows, output)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.rows], "lr": self.lr, "name": "token_rows"}]

    def set_train(self, training: bool) -> None:
        pass  # nothing trained has dropout; the frozen models stay in eval mode

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows.detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.rows.copy_(state["rows"].to(self.rows.device, self.rows.dtype))

    def after_backward(self) -> None:
        pass  # only the chosen rows are a parameter: nothing to mask

    def saved(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, rows) as the file holds them: every chosen row, or with the whole table only the rows that
        differ from the original (bitwise, in the save precision), which keeps the file small."""
        rows = self.rows.detach().cpu().to(self.save_dtype)
        if not self.whole_table:
            return self.ids, rows
        changed = (rows.float() != self.base_rows.to(self.save_dtype).float()).any(dim=1)
        return self.ids[changed], rows[changed]

    def save(self, path: Path, progress: Progress) -> None:
        ids, rows = self.saved()
        metadata = token_rows_metadata(self.parts, self.words, self.tokens, progress.global_step, self.checkpoint_hash)
        metadata["whole_table"] = str(self.whole_table).lower()
        save_token_rows(path, ids, rows, metadata)

    def describe(self) -> str:
        width = self.rows.shape[1]
        if self.whole_table:
            what = f"the whole token table ({len(self.ids):,} rows)"
        else:
            what = ", ".join(f"{token} (#{int(i)})" for token, i in zip(self.tokens, self.ids))
        return f"embedding fine-tuning: {what}; {self.rows.numel():,} trained values ({len(self.ids)} x {width})"


class FullModelHook(TrainerHooks):
    """After the final rows file is written: also a whole model with them in it, built as tools/merge_lora.py
    builds one (a fresh copy of the base model, so frozen weights held in a lower training precision are not
    what gets saved)."""

    writes_outputs = True  # data-parallel: the main process alone writes it

    def __init__(self, model_path: str, config_dir: str | None, v_parameterization: bool | None, path: Path,
                 dtype: torch.dtype):
        self.model_path = model_path
        self.config_dir = config_dir
        self.v_parameterization = v_parameterization
        self.path = path
        self.dtype = dtype

    def after_train(self, trainer, loop, final: Path) -> None:
        from library.models.loading import load_model
        from library.models.saving import save_model
        from library.networks.merge import read_network_file
        from library.networks.token_rows import apply_token_rows

        parts = load_model(self.model_path, self.v_parameterization, self.config_dir)
        weights, _ = read_network_file(final)
        apply_token_rows(parts, weights)
        save_model(parts, self.path, self.dtype)
        print(f"saved the whole model with the trained rows: {self.path}")
