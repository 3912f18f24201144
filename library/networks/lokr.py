"""LoKr (LyCORIS): each adapted weight changes by a Kronecker product, ΔW = kron(w1, w2) · scale. A layer of
size out × in is split as out = a·b, in = c·d; w1 is [a, c], w2 [b, d] (w2 low-rank, w2_a·w2_b, unless the
rank reaches half its larger side). `network.factor` picks a and c (-1: the most balanced split).

Trained with peft's LoKr; written as `<kohya name>.lokr_w1` (or `lokr_w1_a`, `lokr_w1_b`), `.lokr_w2` (or
`lokr_w2_a`, `lokr_w2_b`, CP `lokr_t2`) and `.alpha`, which A1111 and ComfyUI load. Their scale is
alpha / rank when a factor is low-rank and 1 when none is ("full matrix"); peft would use alpha / rank there
too, so such layers are given alpha = rank (what LyCORIS itself does) and train and apply identically.
"""
from __future__ import annotations

import math

import torch
from peft import LoKrConfig
from peft.tuners.lokr import LoKrLayer
from torch import nn

from library.models.parts import ModelParts
from library.networks.base import NetworkKind, NetworkSpec, Target
from library.networks.lora import ADAPTER
from library.networks.peft_lycoris import (alpha_scale, inject_lycoris, load_lycoris, lycoris_layers,
                                           lycoris_metadata, lycoris_parameters, lycoris_state_dict,
                                           refuse_unsupported)
from library.networks.targets import network_targets


def layer_sizes(module: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) LoKr factorises: a Linear's features, a convolution's channels."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups
    return module.out_features, module.in_features


def factor_problem(factor: int, modules: list[tuple[str, nn.Module]]) -> str | None:
    """The one-line error when `factor` (> 0) does not divide a size of every module, else None."""
    if factor <= 0:
        return None
    sizes = [(name, size, side) for name, module in modules for size, side in zip(layer_sizes(module),
                                                                                   ("outputs", "inputs"))]
    bad = next(((name, size, side) for name, size, side in sizes if size % factor), None)
    if bad is None:
        return None
    common = math.gcd(*(size for _, size, _ in sizes))
    divisors = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
    name, size, side = bad
    return (f"network.factor = {factor} does not divide the {size} {side} of {name} (LoKr splits every adapted "
            f"layer's sizes by the factor); use -1 (balanced split) or one of {divisors}")


def model_factor_problem(parts: ModelParts, factor: int, groups: set[str], with_conv: bool) -> str | None:
    """factor_problem over the layers a network on `groups` ("unet", text-encoder groups) adapts in `parts`
    (a loaded model or its weightless skeleton)."""
    return factor_problem(factor, [(t.kohya_name, model.get_submodule(t.path))
                                   for _, model, targets in network_targets(parts, groups, with_conv)
                                   for t in targets])


def _rank(weights: dict[str, torch.Tensor], name: str) -> int | None:
    # A1111 takes the rank of w1_b, then of w2_b when present (w2's wins); a full-matrix module has none
    rank = None
    for key in ("lokr_w1_b", "lokr_w2_b"):
        if f"{name}.{key}" in weights:
            rank = weights[f"{name}.{key}"].shape[0]
    return rank


def lokr_scale(weights: dict[str, torch.Tensor], name: str) -> float:
    return alpha_scale(weights, name, _rank(weights, name))


def _w1(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if f"{name}.lokr_w1" in weights:
        return weights[f"{name}.lokr_w1"].float()
    return weights[f"{name}.lokr_w1_a"].float() @ weights[f"{name}.lokr_w1_b"].float()


def _w2(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if f"{name}.lokr_w2" in weights:
        return weights[f"{name}.lokr_w2"].float()
    w_a, w_b = weights[f"{name}.lokr_w2_a"].float(), weights[f"{name}.lokr_w2_b"].float()
    if f"{name}.lokr_t2" in weights:  # CP/Tucker: core [r, r, kh, kw] with w_a [r, b], w_b [r, d]
        return torch.einsum("ijkl,ip,jr->prkl", weights[f"{name}.lokr_t2"].float(), w_a, w_b)
    return w_a @ w_b


def lokr_delta(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW of a LoKr module as A1111/ComfyUI apply it (multiplier 1)."""
    refuse_unsupported(weights, name)
    w1, w2 = _w1(weights, name), _w2(weights, name)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()) * lokr_scale(weights, name)


def _follow_a1111_scale(model: nn.Module) -> None:
    """Full-matrix layers (no low-rank factor) apply at scale 1 in A1111/ComfyUI: train them so too."""
    for layer in lycoris_layers(model, LoKrLayer).values():
        if ADAPTER in layer.lokr_w1 and ADAPTER in layer.lokr_w2:
            layer.alpha[ADAPTER] = float(layer.r[ADAPTER])
            layer.scaling[ADAPTER] = 1.0


class LokrKind(NetworkKind):
    """LyCORIS LoKr (`algo = "lokr"` in sd-scripts' `--network_module lycoris.kohya`)."""

    name = "lokr"
    file_marker = ".lokr_w1"  # or .lokr_w1_a when w1 is low-rank: module_names looks for both

    def module_names(self, weights: dict[str, torch.Tensor]) -> list[str]:
        return sorted({key.rsplit(".", 1)[0] for key in weights if key.endswith((".lokr_w1", ".lokr_w1_a"))})

    def inject(self, model: nn.Module, targets: list[Target], spec: NetworkSpec) -> None:
        problem = factor_problem(spec.factor, [(t.kohya_name, model.get_submodule(t.path)) for t in targets])
        if problem:
            raise ValueError(problem)
        # LyCORIS's initialisation (w2 starts at zero, w1 random), so LyCORIS learning rates carry over
        inject_lycoris(LoKrConfig, model, targets, spec, decompose_factor=spec.factor, init_weights="lycoris")
        _follow_a1111_scale(model)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return lycoris_parameters(model, LoKrLayer)

    def state_dict(self, model: nn.Module, targets: list[Target], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return lycoris_state_dict(model, LoKrLayer, targets, dtype)

    def load_state_dict(self, model: nn.Module, targets: list[Target], weights: dict[str, torch.Tensor]) -> int:
        return load_lycoris(model, LoKrLayer, targets, weights, lokr_scale)

    def delta(self, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return lokr_delta(weights, name)

    def metadata(self, spec: NetworkSpec) -> dict[str, str]:
        return lycoris_metadata("lokr", spec, {"factor": str(spec.factor)})

    def describe(self, spec: NetworkSpec) -> str:
        conv = f", conv rank {spec.conv_rank} alpha {spec.conv_alpha:g}" if spec.conv_rank else ""
        factor = "balanced split" if spec.factor <= 0 else f"factor {spec.factor}"
        return f"LoKr rank {spec.rank} alpha {spec.alpha:g}, {factor}{conv}"


LOKR = LokrKind()
