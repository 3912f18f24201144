"""Embedding fine-tuning's file: changed rows of a text encoder's token-embedding table (existing tokens, unlike
textual inversion's new ones), as a small .safetensors that tools/merge_lora.py applies to a model.

Tensors: `token_ids` (int64 [n]) and `rows` ([n, width]: the trained rows themselves, not differences, so
applying at weight 1 puts them in bitwise). Metadata (all strings): `kiln_format = "token_rows"`, `words` and
`tokens` (JSON lists), `text_width`, `vocab_size`, `ss_base_model_version` (the family, as sd-scripts names it),
`base_model`, `sd_checkpoint`, `step`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from library.models.header import ModelHeader
from library.networks.compat import NetworkFileError, network_file_problem
from library.training.checkpoints import atomic_save_safetensors

FORMAT = "token_rows"


def is_token_rows(weights: dict[str, torch.Tensor]) -> bool:
    return "token_ids" in weights and "rows" in weights


def save_token_rows(path: Path, token_ids: torch.Tensor, rows: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write the file atomically (metadata values must be strings)."""
    tensors = {"token_ids": token_ids.detach().to("cpu", torch.int64), "rows": rows.detach().cpu()}
    atomic_save_safetensors(tensors, Path(path), {"kiln_format": FORMAT, **metadata})


def token_rows_metadata(parts, words: list[str], tokens: list[str], step: int, checkpoint_hash: str | None
                        ) -> dict[str, str]:
    """What the file records about the model and the words it trains."""
    table = parts.text_encoder.get_input_embeddings().weight
    return {"words": json.dumps(words), "tokens": json.dumps(tokens), "text_width": str(table.shape[1]),
            "vocab_size": str(table.shape[0]), **parts.family.metadata(parts.v_prediction),
            "base_model": str(parts.source), "sd_checkpoint": checkpoint_hash or "", "step": str(step)}


def token_rows_problem(path: str | Path, weights: dict[str, torch.Tensor], metadata: dict[str, str],
                       model: ModelHeader) -> str | None:
    """None when the rows fit the model's (first) text encoder; else why not, naming the family it was made for."""
    if problem := network_file_problem(path, {}, metadata, model):  # the family its metadata names
        return problem
    ids, rows = weights["token_ids"], weights["rows"]
    if ids.dim() != 1 or rows.dim() != 2 or rows.shape[0] != ids.shape[0]:
        return f"{path}: token_ids {tuple(ids.shape)} and rows {tuple(rows.shape)} do not pair up; the file is damaged"
    width = model.text_widths[0] if model.text_widths else None
    if width is not None and rows.shape[1] != width:
        return (f"{path} holds {rows.shape[1]}-wide token rows, but this {model.family.label} model's text encoder "
                f"is {width} wide: they were trained on another model family")
    return None


def apply_token_rows(parts, weights: dict[str, torch.Tensor], weight: float = 1.0) -> int:
    """Put the rows into the model's token-embedding table: row = base + weight · (trained − base), so weight 1
    sets the trained rows exactly. Returns how many rows changed hands. NetworkFileError for ids the table lacks."""
    table = parts.text_encoder.get_input_embeddings().weight
    ids = weights["token_ids"].long().to(table.device)
    if ids.numel() and int(ids.max()) >= table.shape[0]:
        raise NetworkFileError(f"token id {int(ids.max())} is beyond this model's {table.shape[0]}-token table: the "
                               "rows were trained for another tokenizer")
    rows = weights["rows"].to(table.device)
    with torch.no_grad():
        if weight == 1.0:
            table[ids] = rows.to(table.dtype)
        else:
            base = table[ids].float()
            table[ids] = (base + weight * (rows.float() - base)).to(table.dtype)
    return int(ids.numel())
