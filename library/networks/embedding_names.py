"""Embedding names in prompts: a multi-vector embedding named `kiln` is the tokens `kiln kiln_1 kiln_2 ...`
(diffusers' convention); prompts name it once and `expand_name` spells it out. Light on purpose (no torch):
config checks use it."""
from __future__ import annotations

import re
from typing import Mapping

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # also a file name on every OS: A1111 reads the trigger from it


def token_names(name: str, vectors: int) -> list[str]:
    """`kiln`, `kiln_1`, ... one token per vector (diffusers names multi-vector tokens this way)."""
    return [name] + [f"{name}_{i}" for i in range(1, vectors)]


def name_problem(name: str) -> str | None:
    """None when `name` can be a trigger word; else what is wrong with it (no tokenizer needed)."""
    if not _NAME.match(name or ""):
        return (f"embedding.name {name!r} must be one word of letters, digits, '_' or '-' (e.g. kilnpot or "
                "kiln-pot): prompts find the embedding by that word, and A1111 by its file name")
    if not re.search(r"[A-Za-z]", name):
        return f"embedding.name {name!r} needs at least one letter"
    return None


def vocabulary_problem(vocabulary: Mapping[str, int], name: str, vectors: int) -> str | None:
    """None when none of the embedding's tokens exists yet. CLIP lowercases text and stores words with a
    `</w>` suffix, so `Cat` collides with `cat</w>`: a prompt could not tell the embedding from the word."""
    vocab = {token.lower() for token in vocabulary}
    for token in token_names(name, vectors):
        for form in (token.lower(), token.lower() + "</w>"):
            if form in vocab:
                return (f"embedding.name {name!r}: {token!r} is already a token of the model's tokenizer "
                        f"({form!r}), so prompts could not tell your embedding from it; choose a made-up word "
                        f"such as '{name}-emb' or 'my{name}'")
    return None


def expand_name(text: str, name: str, vectors: int) -> str:
    """Spell out a multi-vector name in a prompt: "a kiln" -> "a kiln kiln_1 kiln_2". The tokenizer
    lowercases text, so the match is case-insensitive; `kiln_1` or `kilns` are left alone."""
    if vectors == 1:
        return text
    expanded = " ".join(token_names(name, vectors))
    pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)
    return pattern.sub(lambda _: expanded, text)
