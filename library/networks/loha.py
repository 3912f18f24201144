"""LoHa (LyCORIS): each adapted weight changes by the Hadamard product of two low-rank products,
ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha / rank — rank² expressive directions for 2·rank parameters per side.

Trained with peft's LoHa; written as `<kohya name>.hada_w1_a` [out, r], `.hada_w1_b` [r, in], `.hada_w2_a`,
`.hada_w2_b`, `.alpha` (3x3 convs flatten the kernel into `in`), which A1111 and ComfyUI load. `loha_delta`
is the formula those tools apply (CP/Tucker `hada_t1`/`hada_t2` files from LyCORIS included).
"""
from __future__ import annotations

import torch
from peft import LoHaConfig
from peft.tuners.loha import LoHaLayer
from torch import nn

from library.networks.base import NetworkKind, NetworkSpec, Target
from library.networks.lora import ADAPTER
from library.networks.peft_lycoris import (alpha_scale, inject_lycoris, load_lycoris, lycoris_layers,
                                           lycoris_metadata, lycoris_parameters, lycoris_state_dict,
                                           refuse_unsupported)


def _lycoris_init(model: nn.Module) -> None:
    """LyCORIS's LoHa initialisation (w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0) instead of peft's He
    init: the learning rates LyCORIS users bring are tuned for it (the network starts as a no-op either way)."""
    with torch.no_grad():
        for layer in lycoris_layers(model, LoHaLayer).values():
            layer.hada_w1_b[ADAPTER].normal_(0, 1)
            layer.hada_w2_b[ADAPTER].normal_(0, 1)
            layer.hada_w1_a[ADAPTER].normal_(0, 0.1)
            layer.hada_w2_a[ADAPTER].zero_()


def _factor(weights: dict[str, torch.Tensor], name: str, side: str) -> torch.Tensor:
    w_a, w_b = weights[f"{name}.hada_{side}_a"].float(), weights[f"{name}.hada_{side}_b"].float()
    core = weights.get(f"{name}.hada_t{side[-1]}")
    if core is None:
        return w_a @ w_b.flatten(1)
    # CP/Tucker conv factor: core [r, r, kh, kw] joined with w_a [r, out] and w_b [r, in] → [out, in, kh, kw]
    return torch.einsum("ijkl,jr,ip->prkl", core.float(), w_b, w_a)


def loha_scale(weights: dict[str, torch.Tensor], name: str) -> float:
    return alpha_scale(weights, name, weights[f"{name}.hada_w1_b"].shape[0])


def loha_delta(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW of a LoHa module as A1111/ComfyUI apply it (multiplier 1)."""
    refuse_unsupported(weights, name)
    return _factor(weights, name, "w1") * _factor(weights, name, "w2") * loha_scale(weights, name)


class LohaKind(NetworkKind):
    """LyCORIS LoHa (`algo = "loha"` in sd-scripts' `--network_module lycoris.kohya`)."""

    name = "loha"
    file_marker = ".hada_w1_a"

    def inject(self, model: nn.Module, targets: list[Target], spec: NetworkSpec) -> None:
        inject_lycoris(LoHaConfig, model, targets, spec)
        _lycoris_init(model)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return lycoris_parameters(model, LoHaLayer)

    def state_dict(self, model: nn.Module, targets: list[Target], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return lycoris_state_dict(model, LoHaLayer, targets, dtype)

    def load_state_dict(self, model: nn.Module, targets: list[Target], weights: dict[str, torch.Tensor]) -> int:
        return load_lycoris(model, LoHaLayer, targets, weights, loha_scale)

    def delta(self, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return loha_delta(weights, name)

    def metadata(self, spec: NetworkSpec) -> dict[str, str]:
        return lycoris_metadata("loha", spec)

    def describe(self, spec: NetworkSpec) -> str:
        conv = f", conv rank {spec.conv_rank} alpha {spec.conv_alpha:g}" if spec.conv_rank else ""
        return f"LoHa rank {spec.rank} alpha {spec.alpha:g}{conv}"


LOHA = LohaKind()
