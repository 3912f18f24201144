"""A1111's training prompts (textual inversion, hypernetworks): template files whose lines hold [name] (the
trained tokens) and [filewords] (the image's caption, or its file name), picked per sample with the seed; and
PNG transparency as a per-pixel loss weight."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.batches import Batch, TrainingData, derived_rng
from library.data.captions import CaptionOptions, process_caption
from library.data.images import load_alpha, resize_and_crop
from library.networks.embedding_names import expand_name

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # A1111 strips "01-", "123 " from file names used as captions


def builtin_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


def template_lines(spec: str | list[str], key: str = "embedding.template") -> list[str]:
    """Template lines from a built-in name ("subject_filewords"), a .txt file, one inline line containing
    [name]/[filewords], or a TOML list of lines. Blank lines are dropped. ValueError names `key`."""
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
                raise ValueError(f"{key}: {path} is not UTF-8 text; re-save it as UTF-8") from None
        elif "[" in text:
            lines = [text]
        else:
            raise ValueError(f"{key} {spec!r} is neither a built-in template "
                             f"({', '.join(builtin_templates())}), an existing .txt file, nor a template line "
                             "such as \"[name], [filewords]\"")
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{key} {spec!r} has no lines")
    return lines


def template_problem(spec: str | list[str], key: str = "embedding.template") -> str | None:
    try:
        template_lines(spec, key)
    except (ValueError, OSError) as err:
        return str(err)
    return None


def filename_words(path: Path) -> str:
    """A1111's caption for an image without a caption file: its file name minus a leading number/hyphens."""
    return _LEADING_NUMBERS.sub("", Path(path).stem)


def fill_template(line: str, name: str, filewords: str) -> str:
    """A1111's order: [filewords] first, then [name]."""
    return line.replace("[filewords]", filewords).replace("[name]", name)


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

    def batch(self, epoch: int, positions: list[int], step_seed: int | None = None) -> Batch:
        base = self.base.batch(epoch, positions, step_seed)
        captions = [self.prompt(index, derived_rng(self.base.seed, epoch, position, 6))
                    for position, index in zip(positions, base.item_indices)]
        weight = None
        if self.alpha_weight:
            weight = torch.stack([self.loss_weight(i, f) for i, f in zip(base.item_indices, base.flips)])
        return dataclasses.replace(base, captions=captions, loss_weight=weight)

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
