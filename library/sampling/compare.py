"""compare.py's X/Y/Z plot: render one image per combination of axis values (checkpoints, LoRA multiplier,
prompt search/replace, seed, CFG, steps, sampler) and lay them out in one labelled grid, as A1111's X/Y/Z
plot does, to pick the best epoch of a run."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.networks.embedding_names import expand_name
from library.networks.embeddings import Embedding, add_tokens, load_embedding
from library.networks.merge import merge_network, read_network_file, restore_weights, snapshot_weights
from library.sampling.grid import make_grid
from library.models.parts import ModelParts
from library.models.loading import load_model
from library.sampling.prompt_file import canonical_sampler
from library.sampling.preview import SampleSpec, generate, save_sample

FILE_KINDS = ("model", "lora", "embedding")
AXIS_KINDS = {"model": "full checkpoints", "lora": "LoRA files", "embedding": "embedding files",
              "multiplier": "LoRA multiplier", "sr": "prompt search/replace (the first value is searched)",
              "seed": "seeds", "cfg": "CFG scales", "steps": "sampling steps", "sampler": "sampler names"}
ALIASES = {"checkpoint": "model", "prompt_sr": "sr", "prompt-sr": "sr", "s/r": "sr", "cfg_scale": "cfg",
           "ti": "embedding", "weight": "multiplier"}


class CompareError(ValueError):
    """A bad axis or setting; the message says which and what to do."""


@dataclass
class Axis:
    kind: str
    values: list
    labels: list[str]


@dataclass
class Settings:
    """One cell's settings (the base settings with the axes' values applied)."""

    model: str
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg: float = 7.0
    seed: int = 0
    sampler: str = "euler_a"
    lora: str = ""
    multiplier: float = 1.0
    embedding: str = ""
    token: str = ""  # the embedding's word in prompts; "" = the (first) embedding file's name
    sr: tuple[str, str] | None = None
    clip_skip: int = 1
    v_parameterization: bool | None = None
    config_dir: str = ""
    extra: dict = field(default_factory=dict)

    def spec(self) -> SampleSpec:
        prompt = self.prompt
        if self.sr is not None:
            prompt = prompt.replace(*self.sr)
        return SampleSpec(prompt, self.negative_prompt, self.width, self.height, self.steps, self.cfg, self.seed,
                          self.sampler)

    def describe(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("extra")
        return {k: v for k, v in data.items() if v not in ("", None)}


def _split(text: str) -> list[str]:
    """Comma-separated values; "double quotes" keep commas inside a value (as in A1111)."""
    row = next(csv.reader([text], skipinitialspace=True), [])
    return [value.strip() for value in row if value.strip()]


def _natural(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _files(values: list[str], kind: str) -> list[str]:
    files: list[str] = []
    for value in values:
        if value.lower() in ("none", "-") and kind != "model":
            files.append("")  # the base model without the add-on
            continue
        if value.startswith("builtin:"):
            files.append(value)
            continue
        matches = sorted(glob.glob(str(Path(value).expanduser())), key=_natural)
        if not matches:
            raise CompareError(f"{kind} axis: nothing matches {value!r}; give existing files, a glob such as "
                               "'output/*.safetensors', or 'none' for the base model")
        files.extend(matches)
    return files


def parse_axis(kind: str, text: str) -> Axis:
    """An axis from its kind (see AXIS_KINDS) and its comma-separated values."""
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in AXIS_KINDS:
        raise CompareError(f"unknown axis kind {kind!r}; use one of: {', '.join(AXIS_KINDS)}")
    values = _split(text)
    if not values:
        raise CompareError(f"{kind} axis: no values in {text!r}")
    try:
        if kind in FILE_KINDS:
            files = _files(values, kind)
            return Axis(kind, files, [Path(f).stem if f else "none" for f in files])
        if kind in ("seed", "steps"):
            parsed = [int(v) for v in values]
        elif kind in ("cfg", "multiplier"):
            parsed = [float(v) for v in values]
        elif kind == "sampler":
            parsed = [canonical_sampler(v) for v in values]
        else:  # sr: the first value is the search string; each value replaces it (the first one: no change)
            return Axis(kind, [(values[0], v) for v in values], values)
    except ValueError as err:
        raise CompareError(f"{kind} axis {text!r}: {err}") from None
    return Axis(kind, parsed, [f"{kind}: {v:g}" if isinstance(v, float) else f"{kind}: {v}" for v in parsed])


def cells(base: Settings, axes: list[Axis | None]) -> dict[tuple[int, int, int], Settings]:
    """Settings per (x, y, z) cell."""
    filled = [axis or Axis("", [None], [""]) for axis in (list(axes) + [None] * 3)[:3]]
    out = {}
    for (x, xv), (y, yv), (z, zv) in itertools.product(*(enumerate(a.values) for a in filled)):
        settings = dataclasses.replace(base)
        for axis, value in zip(filled, (xv, yv, zv)):
            if axis.kind:
                setattr(settings, axis.kind, value)
        out[(x, y, z)] = settings
    return out


# ---------------------------------------------------------------------------------------------- model state


class Models:
    """The current base model, loaded when a cell names another checkpoint, with LoRAs merged into a fresh copy
    of the base weights per cell (the touched weights are restored afterwards) and embeddings set as token rows."""

    def __init__(self):
        self.path: str | None = None
        self.parts: ModelParts | None = None
        self.token_ids: dict[str, list[int]] = {}
        self.embeddings: dict[str, Embedding] = {}

    def load(self, settings: Settings) -> ModelParts:
        if settings.model != self.path:
            self.parts = None  # free the previous model first
            self.parts = load_model(settings.model, settings.v_parameterization, settings.config_dir or None)
            self.path, self.token_ids = settings.model, {}
        return self.parts

    def embedding(self, path: str) -> Embedding:
        if path not in self.embeddings:
            self.embeddings[path] = load_embedding(path)
        return self.embeddings[path]

    @contextlib.contextmanager
    def applied(self, settings: Settings):
        """The model for `settings`, with its LoRA and embedding in place; yields the prompt spec to render."""
        parts = self.load(settings)
        spec = settings.spec()
        if settings.embedding:
            embedding = self.embedding(settings.embedding)
            token = settings.token or embedding.name
            vectors = embedding.vectors.shape[0]
            tensors = embedding.tensors_for([slot.embedding_key for slot in parts.family.text_encoders])
            ids = self.token_ids.get(token)
            if ids is None:
                ids = self.token_ids[token] = [add_tokens(tokenizer, encoder, token, vectors) for tokenizer, encoder
                                               in zip(parts.tokenizers, parts.text_encoders)][0]
            if len(ids) != vectors:
                raise CompareError(f"{settings.embedding} has {vectors} vector(s) but {token!r} was first loaded "
                                   f"with {len(ids)}; compare embeddings of one run (same vector count)")
            for encoder, values in zip(parts.text_encoders, tensors):  # one set per text encoder (SDXL: two)
                weight = encoder.get_input_embeddings().weight
                with torch.no_grad():
                    weight[ids] = values.to(weight.device, weight.dtype)
            spec = dataclasses.replace(spec, prompt=expand_name(spec.prompt, token, vectors),
                                       negative_prompt=expand_name(spec.negative_prompt, token, vectors))
        if not settings.lora:
            yield parts, spec
            return
        weights, _ = read_network_file(settings.lora)
        saved = snapshot_weights(parts, weights)  # each cell merges onto the untouched base
        try:
            unmatched = merge_network(parts, weights, settings.multiplier)
            if unmatched:
                print(f"note: {settings.lora}: {len(unmatched)} module(s) match nothing in this model, "
                      f"e.g. {unmatched[0]}")
            yield parts, spec
        finally:
            restore_weights(saved)


# ---------------------------------------------------------------------------------------------- the plot


def render(base: Settings, axes: list[Axis | None], output_dir: Path, font_size: int | None = None) -> Path:
    """Render every cell into output_dir/cells/, the labelled grid into output_dir/grid.png; returns its path.
    Both carry their settings in PNG text chunks (`parameters` as A1111 writes it, `kiln_compare` as JSON)."""
    if base.sr is None and any(a and a.kind == "sr" for a in axes):
        search = next(a for a in axes if a and a.kind == "sr").values[0][0]
        if search not in base.prompt:
            raise CompareError(f"sr axis: the search string {search!r} is not in the prompt {base.prompt!r}")
    plan = cells(base, axes)
    models = Models()
    images = {}
    output_dir = Path(output_dir)
    # cells that share a checkpoint run together, so each full checkpoint loads once
    order = sorted(plan, key=lambda key: (plan[key].model, key[2], key[1], key[0]))
    for number, key in enumerate(order, 1):
        settings = plan[key]
        with models.applied(settings) as (parts, spec):
            image = generate(parts, spec, settings.clip_skip)
        images[key] = image
        path = output_dir / "cells" / f"x{key[0]:02d}-y{key[1]:02d}-z{key[2]:02d}.png"
        save_sample(image, path, spec, {"kiln_compare": json.dumps(settings.describe())})
        print(f"[{number}/{len(order)}] {path.name}: {spec.prompt[:60]!r}")
    labels = [(axis.labels if axis else [""]) for axis in (list(axes) + [None] * 3)[:3]]
    grid, _ = make_grid(images, *labels, font_size=font_size)
    meta = {"base": base.describe(),
            "axes": {name: {"kind": a.kind, "values": a.labels} for name, a in zip("xyz", axes) if a}}
    path = output_dir / "grid.png"
    save_sample(grid, path, base.spec(), {"kiln_compare": json.dumps(meta)})
    return path
