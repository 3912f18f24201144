"""The network-kind interface: how an add-on network (LoRA/LoCon, LoHa, LoKr) is put into a model,
trained, written in the file layout A1111/ComfyUI/diffusers read, and turned back into weight changes for
merging and comparing. Trainers and tools only talk to this interface (library/networks/kinds.py picks one)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetworkSpec:
    """A network's shape: rank/alpha for Linear and 1x1 layers, conv_rank/conv_alpha for 3x3 convs (0 = none);
    factor: LoKr's Kronecker split of each layer size (-1 = most balanced; other kinds ignore it);
    target_ranks: (module path, rank, alpha) of modules whose rank differs (block_dims); rank_dropout and
    module_dropout: sd-scripts' LoRA dropouts (LoRA only)."""

    rank: int
    alpha: float
    conv_rank: int = 0
    conv_alpha: float = 1.0
    dropout: float = 0.0
    factor: int = -1
    target_ranks: tuple[tuple[str, int, float], ...] = ()
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    def rank_patterns(self, targets: list["Target"]) -> tuple[dict[str, int], dict[str, float]]:
        """peft's rank_pattern / alpha_pattern: 3x3 convs at conv_rank/conv_alpha, then target_ranks. peft
        matches keys as regex suffixes of module names, so full paths are anchored (`conv1` ≠ `..._conv1`)."""
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        paths = {t.path for t in targets}
        overrides = [(t.path, self.conv_rank, self.conv_alpha) for t in targets if t.is_conv3x3]
        for path, rank, alpha in overrides + [r for r in self.target_ranks if r[0] in paths]:
            key = rf"^{re.escape(path)}$"
            ranks[key], alphas[key] = rank, alpha
        return ranks, alphas


@dataclass(frozen=True)
class Target:
    """One adaptable module: its path in the model, its kohya name in files, and whether it is a 3x3 conv."""

    path: str
    kohya_name: str
    is_conv3x3: bool


class NetworkKind:
    """Base class of a network kind; one instance per kind is registered in kinds.py."""

    name: str = ""  # the network.type value
    file_marker: str = ""  # the tensor-name suffix (after the module name) every module of its files has

    def inject(self, model: nn.Module, targets: list[Target], spec: NetworkSpec) -> None:
        """Add the network's layers to `model` at `targets`; only their weights are left trainable."""
        raise NotImplementedError

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The injected trainable parameters of `model`."""
        raise NotImplementedError

    def state_dict(self, model: nn.Module, targets: list[Target], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The injected weights under the file layout's names."""
        raise NotImplementedError

    def load_state_dict(self, model: nn.Module, targets: list[Target], weights: dict[str, torch.Tensor]) -> int:
        """Copy file-layout weights into injected layers; returns modules loaded. ValueError on a shape that
        does not fit the configured network."""
        raise NotImplementedError

    def module_names(self, weights: dict[str, torch.Tensor]) -> list[str]:
        """The module names a file of this kind holds."""
        return sorted({key[: -len(self.file_marker)] for key in weights if key.endswith(self.file_marker)})

    def delta(self, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """The weight change module `name` makes at multiplier 1, as A1111 and ComfyUI compute it (fp32; conv
        kernels as [out, in, k, k] or flattened to [out, in·k·k] — merge reshapes to the weight). ValueError for
        a module Kiln cannot apply."""
        raise NotImplementedError

    def scale_weight_norms(self, model: nn.Module, targets: list[Target], max_norm: float) -> list[tuple[bool, float]]:
        """sd-scripts' max-norm regularisation of the injected modules: (scaled, norm after) per module.
        NotImplementedError for kinds without it (the config refuses network.scale_weight_norms for them)."""
        raise NotImplementedError(f"network.scale_weight_norms is not implemented for {self.name}")

    def metadata(self, spec: NetworkSpec) -> dict[str, str]:
        """`ss_network_module`, `ss_network_args`, `ss_network_dim`, `ss_network_alpha` as sd-scripts writes them."""
        raise NotImplementedError

    def describe(self, spec: NetworkSpec) -> str:
        """One line for the run summary, e.g. "LoRA rank 16 alpha 8, conv rank 4 alpha 1"."""
        raise NotImplementedError
