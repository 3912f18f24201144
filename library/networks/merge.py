"""Network files applied to a base model: read one, add its weight changes into the model's weights (merge),
and put the original weights back (compare.py renders each cell on the untouched base)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from library.models.parts import ModelParts
from library.networks.compat import NetworkFileError
from library.networks.kinds import kind_of_weights
from library.networks.targets import module_map


def read_network_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a network .safetensors file (NetworkFileError naming the file if it is none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as err:
        raise NetworkFileError(f"{path} is not a readable .safetensors LoRA file ({err})") from None


def merge_network(parts: ModelParts, weights: dict[str, torch.Tensor], multiplier: float = 1.0) -> list[str]:
    """Add a network file's weight changes (LoRA, LoHa or LoKr) into the base weights in place:
    W += multiplier · ΔW. Returns the module names the file has that match nothing in the model (so callers can
    refuse or warn). NetworkFileError (a ValueError) for a module whose change does not fit its layer."""
    kind = kind_of_weights(weights)
    if kind is None:
        return []
    modules = module_map(parts)
    unmatched = []
    for name in kind.module_names(weights):
        module = modules.get(name)
        if module is None:
            unmatched.append(name)
            continue
        delta = kind.delta(weights, name) * multiplier
        if delta.numel() != module.weight.numel():
            raise NetworkFileError(f"{name}: the file changes a {tuple(delta.shape)} weight, the model's is "
                                   f"{tuple(module.weight.shape)}; the file was made for another model")
        with torch.no_grad():
            module.weight += delta.to(module.weight.dtype).reshape(module.weight.shape)
    return unmatched


def snapshot_weights(parts: ModelParts, weights: dict[str, torch.Tensor]) -> list[tuple[nn.Module, torch.Tensor]]:
    """Copies of the base weights a network file changes, to restore with `restore_weights`."""
    kind = kind_of_weights(weights)
    names = set(kind.module_names(weights)) if kind else set()
    return [(module, module.weight.detach().clone()) for name, module in module_map(parts).items() if name in names]


def restore_weights(saved: list[tuple[nn.Module, torch.Tensor]]) -> None:
    with torch.no_grad():
        for module, weight in saved:
            module.weight.copy_(weight)
