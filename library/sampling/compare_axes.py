"""compare.py's axes and cells: what an X/Y/Z plot varies (checkpoints, LoRA multiplier, hypernetworks and their
strengths, prompt search/replace, seed, CFG, steps, sampler) and the settings of each cell. Light on purpose:
compare.py checks its arguments with this before any model library loads."""
from __future__ import annotations

import csv
import dataclasses
import glob
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from library.errors import UserError
from library.sampling.prompt_file import SampleSpec, canonical_sampler

FILE_KINDS = ("model", "lora", "embedding")
AXIS_KINDS = {"model": "full checkpoints", "lora": "LoRA, LoHa or LoKr files", "embedding": "embedding files",
              "hypernetwork": "A1111 hypernetwork files, each with an optional strength (hn.pt:0.5; globs; none)",
              "multiplier": "LoRA multiplier", "sr": "prompt search/replace (the first value is searched)",
              "seed": "seeds", "cfg": "CFG scales", "steps": "sampling steps", "sampler": "sampler names"}
ALIASES = {"checkpoint": "model", "prompt_sr": "sr", "prompt-sr": "sr", "s/r": "sr", "cfg_scale": "cfg",
           "ti": "embedding", "weight": "multiplier", "hypernet": "hypernetwork"}


class CompareError(UserError, ValueError):
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
    width: int = 0  # 0 = the model's native size
    height: int = 0
    steps: int = 20
    cfg: float = 7.0
    seed: int = 0
    sampler: str = "euler_a"
    lora: str = ""
    multiplier: float = 1.0
    embedding: str = ""
    hypernetwork: str = ""  # an A1111 hypernetwork .pt
    hypernetwork_strength: float = 1.0
    token: str = ""  # the embedding's word in prompts; "" = the (first) embedding file's name
    sr: tuple[str, str] | None = None
    clip_skip: int = 1
    max_token_length: int = 75
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


def split_strength(value: str) -> tuple[str, float | None]:
    """"file.pt:0.5" → ("file.pt", 0.5); no number after the last ':' → (value, None), so Windows paths
    ("C:\\x.pt") keep their drive letter."""
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, None


def _hypernetwork_axis(values: list[str]) -> Axis:
    """Cells set the file and its strength (1 when a value gives none)."""
    cells, labels = [], []
    for value in values:
        path, strength = split_strength(value)
        for found in _files([path], "hypernetwork"):
            cells.append({"hypernetwork": found, "hypernetwork_strength": 1.0 if strength is None else strength})
            label = Path(found).stem if found else "none"
            labels.append(f"{label}:{strength:g}" if found and strength is not None else label)
    return Axis("hypernetwork", cells, labels)


def parse_axis(kind: str, text: str) -> Axis:
    """An axis from its kind (see AXIS_KINDS) and its comma-separated values."""
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in AXIS_KINDS:
        raise CompareError(f"unknown axis kind {kind!r}; use one of: {', '.join(AXIS_KINDS)}")
    values = _split(text)
    if not values:
        raise CompareError(f"{kind} axis: no values in {text!r}")
    if kind == "hypernetwork":
        return _hypernetwork_axis(values)
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
                for key, part in (value.items() if isinstance(value, dict) else [(axis.kind, value)]):
                    setattr(settings, key, part)  # a dict sets several settings (a file and its strength)
        out[(x, y, z)] = settings
    return out


def cell_label(axes: list[Axis | None], key: tuple[int, int, int]) -> str:
    """"x lora: a.safetensors, y seed: 2" — the axis values of one cell, for progress lines."""
    parts = [f"{name} {axis.labels[index]}" for name, axis, index in zip("xyz", axes, key) if axis]
    return ", ".join(parts) or "the only cell"
