"""How big a model's parts are, read from tensor shapes without loading weights: what `--check` needs to
estimate the size of the files a run will save (library/training/disk_space.py). From a single file's header, a
diffusers folder's .safetensors headers, or — for the built-in models, which have no files — the shipped
`sizes.json` beside their configs (tests/models/test_sizes.py keeps it equal to the built model)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from library.models import ldm_layout as layout

PARTS = ("unet", "text", "vae")  # "text": every text encoder together
SIZES_FILE = "sizes.json"


@dataclass(frozen=True)
class PartSize:
    params: int  # every weight
    adapter_io: int  # Σ(in + out) of the layers a LoRA may adapt: linear weights and 1×1 convs, not embeddings
    conv_io: int  # Σ(in·k·k + out) of the k×k convolutions (k > 1), which LoCon also adapts


ModelSizes = dict[str, PartSize]


def _add(totals: dict[str, list[int]], part: str, name: str, shape: tuple[int, ...]) -> None:
    count = 1
    for dim in shape:
        count *= dim
    row = totals.setdefault(part, [0, 0, 0])
    row[0] += count
    if "embed" in name or "norm" in name:
        return
    if len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)):
        row[1] += shape[0] + shape[1]
    elif len(shape) == 4:
        row[2] += shape[1] * shape[2] * shape[3] + shape[0]


def sizes_from_shapes(shapes: Iterable[tuple[str, tuple[int, ...]]], part_of: Callable[[str], str | None]) -> ModelSizes:
    """Sum (name, shape) pairs into parts; `part_of` names a tensor's part (None: not counted)."""
    totals: dict[str, list[int]] = {}
    for name, shape in shapes:
        part = part_of(name)
        if part is not None:
            _add(totals, part, name, tuple(shape))
    return {part: PartSize(*row) for part, row in totals.items()}


def ldm_part(key: str) -> str | None:
    """The part of a single-file (LDM layout) tensor."""
    if key.startswith(layout.UNET_PREFIX):
        return "unet"
    if key.startswith(("cond_stage_model.", "conditioner.")):
        return "text"
    return "vae" if key.startswith("first_stage_model.") else None


def folder_sizes(folder: Path) -> ModelSizes | None:
    """Sizes of a diffusers folder from its .safetensors headers; None when a part has only pickled weights."""
    from safetensors import safe_open

    pairs: list[tuple[str, tuple[int, ...]]] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        part = "text" if sub.name.startswith("text_encoder") else sub.name if sub.name in PARTS else None
        if part is None:
            continue
        files = sorted(sub.glob("*.safetensors"))
        if not files:
            return None
        for file in files:
            with safe_open(str(file), framework="numpy") as handle:
                pairs += [(f"{part}/{key}", tuple(handle.get_slice(key).get_shape())) for key in handle.keys()]
    sizes = sizes_from_shapes(pairs, lambda name: name.split("/", 1)[0])
    return sizes if "unet" in sizes else None


def read_sizes_file(path: Path) -> ModelSizes | None:
    """The shipped sizes of a built-in model, or None when its folder has none."""
    if not path.is_file():
        return None
    return {part: PartSize(**row) for part, row in json.loads(path.read_text(encoding="utf-8")).items()}


def measured_sizes(unet, text_encoders, vae) -> ModelSizes:
    """Sizes of loaded modules (to write and to test a built-in model's sizes.json)."""
    pairs = [(f"unet/{n}", tuple(p.shape)) for n, p in unet.named_parameters()]
    for encoder in text_encoders:
        pairs += [(f"text/{n}", tuple(p.shape)) for n, p in encoder.named_parameters()]
    pairs += [(f"vae/{n}", tuple(p.shape)) for n, p in vae.named_parameters()]
    return sizes_from_shapes(pairs, lambda name: name.split("/", 1)[0])


def sizes_json(sizes: ModelSizes) -> str:
    return json.dumps({part: asdict(size) for part, size in sizes.items()}, indent=2) + "\n"


if __name__ == "__main__":  # regenerate the built-in models' sizes.json: python -m library.models.sizes
    from library.models.builtin import build_builtin
    from library.models.paths import BUILTIN_MODELS, CONFIG_ROOT

    for builtin in BUILTIN_MODELS:
        model = build_builtin(builtin)
        (CONFIG_ROOT / builtin / SIZES_FILE).write_text(sizes_json(
            measured_sizes(model.unet, model.text_encoders, model.vae)))
        print(f"wrote {CONFIG_ROOT / builtin / SIZES_FILE}")
