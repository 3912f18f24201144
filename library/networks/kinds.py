"""The network kinds Kiln trains and reads, by `network.type` and by what a file holds."""
from __future__ import annotations

import torch

from library.networks.base import NetworkKind
from library.networks.loha import LOHA
from library.networks.lokr import LOKR
from library.networks.lora import LORA

NETWORK_KINDS: dict[str, NetworkKind] = {kind.name: kind for kind in (LORA, LOHA, LOKR)}


def kind_named(name: str) -> NetworkKind:
    """The kind for a `network.type` value; KeyError names the known ones."""
    try:
        return NETWORK_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown network type {name!r}; known: {', '.join(NETWORK_KINDS)}") from None


def file_layouts() -> str:
    """What each kind's files hold, for messages: "LoRA (*.lora_down.weight), ..."."""
    return ", ".join(f"{kind.name} (*{kind.file_marker})" for kind in NETWORK_KINDS.values())


def kind_of_weights(weights: dict[str, torch.Tensor]) -> NetworkKind | None:
    """The kind whose modules a file's tensors are, or None (not a network file Kiln reads)."""
    return next((kind for kind in NETWORK_KINDS.values() if kind.module_names(weights)), None)
