"""train_embedding_finetune.py's recipe: embedding fine-tuning — the rows of chosen existing tokens (or the whole
token-embedding table) of the text encoder trained on the run's captions, everything else frozen; saved as a
small rows file (library/networks/token_rows.py) that tools/merge_lora.py applies, and optionally a whole model.

Its own script rather than a mode of textual inversion: it adds no token and no trigger word, trains on the
captions as LoRA and DreamBooth do (A1111's templates exist to place a new word), writes another file, and
half of [embedding]'s keys (name, init_text, vectors, format, resume) would not apply to it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from library.config.schema import RunConfig, Section, fill_defaults
from library.recipes.base import Built, Recipe, table


class EmbeddingFinetuneSection(Section):
    tokens: list[str] = []  # words whose token rows train; each through the tokenizer (a word may be several tokens)
    whole_table: bool = False  # train every row of the token-embedding table instead (tokens = [])
    full_model: Literal["none", "single_file", "diffusers"] = "none"  # also save the model with the rows in it
    full_model_precision: Literal["fp16", "bf16", "fp32"] = "fp16"


class EmbeddingFinetuneRunConfig(RunConfig):
    """train_embedding_finetune.py. Defaults as textual inversion's (token rows are embeddings too): lr 0.001,
    AdamW without weight decay (which would move every row), no gradient clipping, fp32 rows."""

    trainer_kind = "embedding_finetune"
    embedding_finetune: EmbeddingFinetuneSection

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optimizer = data.get("optimizer") if isinstance(data.get("optimizer"), dict) else {}
        defaults = {("save", "precision"): "fp32", ("save", "name"): "token_rows", ("optimizer", "lr"): 0.001,
                    ("optimizer", "max_grad_norm"): 0.0}
        if str(optimizer.get("name", "AdamW")).lower().replace("_", "").startswith("adamw"):
            defaults[("optimizer", "args")] = {"weight_decay": 0.0}
        return fill_defaults(data, defaults)

    @model_validator(mode="after")
    def _rules(self) -> "EmbeddingFinetuneRunConfig":
        section, problems = self.embedding_finetune, []
        if bool(section.tokens) == section.whole_table:
            problems.append("embedding_finetune: set either tokens = [\"word\", ...] (the rows to train) or "
                            "whole_table = true, not both and not neither")
        blank = [word for word in section.tokens if not word.strip()]
        if blank or len(set(section.tokens)) != len(section.tokens):
            problems.append(f"embedding_finetune.tokens = {section.tokens}: list each word once, none empty")
        if self.dataset.cache_text_encoder_outputs:
            problems.append("embedding fine-tuning trains what the text encoder reads, so its outputs cannot be "
                            "cached: set dataset.cache_text_encoder_outputs = false")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _resolved_tokens(words: list[str]) -> list[tuple[str, list[tuple[str, int]]]]:
    from library.models.clip_tokenizer import clip_tokens

    return [(word, clip_tokens(word)) for word in words]


class EmbeddingFinetuneRecipe(Recipe):
    name = "embedding_finetune"
    config_class = EmbeddingFinetuneRunConfig

    def environment_problems(self, data: dict) -> list[str]:
        from library.models.clip_tokenizer import TokenizerUnavailable

        words = table(data, "embedding_finetune").get("tokens", [])
        words = [w for w in words if isinstance(w, str) and w.strip()] if isinstance(words, list) else []
        try:  # checked again against the model's own tokenizer when it loads
            empty = [word for word, tokens in _resolved_tokens(words) if not tokens]
        except TokenizerUnavailable:
            return []
        return [f"embedding_finetune.tokens: {word!r} has no tokens (the tokenizer drops it); use a word"
                for word in empty]

    def optimizer_lrs(self, config: EmbeddingFinetuneRunConfig) -> dict[str, float]:
        return {"token_rows": config.optimizer.lr}

    def model_lines(self, config: EmbeddingFinetuneRunConfig, header) -> list[str]:
        from library.models.clip_tokenizer import TokenizerUnavailable

        section, width = config.embedding_finetune, header.text_widths[0] if header.text_widths else 0
        if section.whole_table:
            return [f"embedding fine-tuning: every row of the token table ({width} wide); the file keeps the rows "
                    "that change"]
        try:
            resolved = _resolved_tokens(section.tokens)
        except TokenizerUnavailable:
            return [f"embedding fine-tuning: the rows of {', '.join(section.tokens)}"]
        rows = sum(len(tokens) for _, tokens in resolved)
        spelled = "; ".join(f"{word!r} → " + " ".join(f"{t} (#{i})" for t, i in tokens) for word, tokens in resolved)
        return [f"embedding fine-tuning: {rows} row(s) x {width} = {rows * width:,} trained values: {spelled}"]

    def trained_parts(self, config: EmbeddingFinetuneRunConfig) -> frozenset[str]:
        # the trained rows start from the token embeddings: read exact, then cast with the frozen rest
        return frozenset({"token_embeddings"})

    def text_encoder_trained_by(self, config: EmbeddingFinetuneRunConfig) -> str | None:
        return None  # the encoder's weights never change; caching is refused by the config's own rule

    def build(self, parts, run) -> Built:
        # imported here: they pull in torch and diffusers, which --help/--check do not need
        from library.models.hashes import a1111_short_hash
        from library.networks.token_rows_trainable import FullModelHook, TokenRowsTrainable
        from library.training.device import SAVE_DTYPES

        config: EmbeddingFinetuneRunConfig = run.config
        section = config.embedding_finetune
        ids, tokens = (None, []) if section.whole_table else _model_tokens(parts.tokenizer, section.tokens)
        if ids is not None:
            _check_captions_reach(parts.tokenizer, config, run.data.items, ids)
        trainable = TokenRowsTrainable(parts, ids, list(section.tokens), tokens, config.optimizer.lr, run.save_dtype,
                                       a1111_short_hash(config.model.path))
        lines = [trainable.describe()]
        hooks = None
        if section.full_model != "none":
            name = f"{config.save.name}-model" + (".safetensors" if section.full_model == "single_file" else "")
            path = Path(config.save.output_dir) / name
            model = config.model
            hooks = FullModelHook(model.path, model.config_dir or None,
                                  None if model.v_parameterization == "auto" else model.v_parameterization, path,
                                  SAVE_DTYPES[section.full_model_precision])
            lines.append(f"after training: the whole model with these rows, {path} ({section.full_model_precision})")
        return Built(trainable, hooks, lines=lines)


def _model_tokens(tokenizer, words: list[str]) -> tuple[list[int], list[str]]:
    """The token ids (each once, in order) of the words through the model's own tokenizer, and their spellings."""
    ids: list[int] = []
    for word in words:
        found = tokenizer(word, add_special_tokens=False).input_ids
        if not found:
            raise ValueError(f"embedding_finetune.tokens: {word!r} has no tokens in this model's tokenizer")
        ids += [i for i in found if i not in ids]
    return ids, tokenizer.convert_ids_to_tokens(ids)


def _check_captions_reach(tokenizer, config: EmbeddingFinetuneRunConfig, items: list, ids: list[int]) -> None:
    """Refuse a run none of whose captions contains a chosen token: its rows would never receive a gradient."""
    ds, chosen = config.dataset, set(ids)
    for item in items:
        text = " ".join(p for p in (ds.caption_prefix, item.caption, ds.caption_suffix) if p)
        if chosen & set(tokenizer(text, add_special_tokens=False).input_ids):
            return
    words = ", ".join(config.embedding_finetune.tokens)
    raise ValueError(f"no caption contains any of embedding_finetune.tokens ({words}), so nothing would train: pick "
                     "words your captions use, or add them to the captions")


RECIPE = EmbeddingFinetuneRecipe()
