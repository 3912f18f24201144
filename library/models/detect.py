"""The model family of a model path, told without loading any weights (for config checks before a run): the
built-in's or a diffusers folder's configs, or the tensor names in a .safetensors header."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from library.models.families import ModelFamily, family_for_configs, family_for_ldm_keys
from library.models.paths import BUILTIN_PREFIX, BUILTIN_MODELS, CONFIG_ROOT

_MAX_HEADER = 100 * 2**20  # a safetensors header this large is no model header


def _folder_family(folder: Path) -> ModelFamily | None:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        text = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return family_for_configs(unet, text)


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a .safetensors header (8-byte little-endian length, then JSON); reads no tensor."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > _MAX_HEADER:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        header = json.loads(handle.read(length))
    return [key for key in header if key != "__metadata__"]


def family_of_path(path: str) -> ModelFamily | None:
    """The family of a built-in name, a diffusers folder or a .safetensors file; None when it cannot be told
    cheaply (.ckpt pickles, unreadable files, hub ids): the loader decides then."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        return _folder_family(CONFIG_ROOT / name) if name in BUILTIN_MODELS else None
    target = Path(path).expanduser()
    if target.is_dir():
        return _folder_family(target)
    if target.is_file() and target.suffix.lower() == ".safetensors":
        try:
            return family_for_ldm_keys(safetensors_keys(target))
        except (OSError, ValueError, struct.error):
            return None
    return None
