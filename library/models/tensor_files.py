"""Reading model weights lean: a .safetensors file's header without its data, and its tensors copied out of the
memory-mapped file one at a time, each cast to the dtype its part is kept in as it is read.

Why by hand rather than `safetensors.torch.load_file`: load_file returns views into one mapping of the whole file,
so every page read stays resident (and counted in the process's RSS) until the last tensor is dropped — the whole
fp32 file on top of the cast copies — and an fp32 model loaded that way keeps the file mapped for the whole run.
Here the file is unmapped and reopened every `CHUNK_BYTES`, and every returned tensor owns its memory: nothing
refers to the file afterwards (it may even be deleted or overwritten while training runs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from library.models.paths import ModelLoadError
from library.safe_load import first_line

CHUNK_BYTES = 256 << 20  # bytes read through one mapping before it is closed and the file reopened


def _unreadable(path: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(f"Cannot read {path} as safetensors ({first_line(exc)}); the file may be incomplete or "
                          "corrupt.")


def safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor's shape and the file's metadata, read from the header alone (no tensor data)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.offset_keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise _unreadable(path, exc) from None
    return shapes, metadata


def owned_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` as a new tensor with its own memory, floats cast to `dtype` (integers keep theirs)."""
    return tensor.to(dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def read_safetensors(path: Path, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The tensors named in `dtypes` (in file order), each cast to its dtype as it is read. At most CHUNK_BYTES of
    the file are mapped at a time; the result shares no memory with the file."""
    wanted = set(dtypes)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = [key for key in handle.offset_keys() if key in wanted]
        position = 0
        while position < len(keys):
            with safe_open(str(path), framework="pt") as handle:  # closing it unmaps what was read
                mapped = 0
                while position < len(keys) and mapped < CHUNK_BYTES:
                    key = keys[position]
                    source = handle.get_tensor(key)
                    tensors[key] = owned_copy(source, dtypes[key])
                    mapped += source.nbytes
                    del source
                    position += 1
    except Exception as exc:  # noqa: BLE001 - a file cut short shows only when its data is read
        raise _unreadable(path, exc) from None
    missing = wanted - set(tensors)
    if missing:
        raise ModelLoadError(f"{path} has no tensor {sorted(missing)[0]!r}")
    return tensors


def own_memory(module: torch.nn.Module) -> None:
    """Give every tensor of a module loaded by a library's own from_pretrained its own memory, one at a time.
    Loaded without a cast, they are views into the memory-mapped weights file, which then stays mapped (and
    resident) for as long as the module lives, and changes with the file."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()
