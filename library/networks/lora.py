"""LoRA / LoCon: injected with peft, saved and loaded in the kohya key layout, merged as up·down·alpha/rank.

peft does the injection, dropout, scaling (alpha / rank) and per-module ranks. What we write by hand is the
file layout: kohya tensor names are fixed strings other tools look up (REFERENCE.md); the module names come
from library/networks/targets.py and the model family.
"""
from __future__ import annotations

import json

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from library.networks.base import NetworkKind, NetworkSpec, Target
from library.networks.lean_forward import use_lean_forward

ADAPTER = "kiln"


def add_lora(model: nn.Module, targets: list[Target], spec: NetworkSpec) -> None:
    """Inject LoRA layers (peft) into `model`, with the lean forward (lean_forward.py); only their weights are left
    trainable."""
    ranks, alphas = spec.rank_patterns(targets)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=[t.path for t in targets], rank_pattern=ranks, alpha_pattern=alphas)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    use_lean_forward(model)
    if spec.rank_dropout or spec.module_dropout:
        add_lora_dropouts(model, spec.rank_dropout, spec.module_dropout)


def add_lora_dropouts(model: nn.Module, rank_dropout: float, module_dropout: float) -> None:
    """sd-scripts' rank and module dropout (LoRAModule.forward), in training mode only. peft's LoRA layer has
    neither, so they are forward hooks on its down and up projections:
    - rank dropout zeroes each rank channel of the down projection's output per sample with probability p
      (one draw per sample and rank, shared by its tokens or pixels) and scales the rest by 1/(1−p);
    - module dropout skips a module's whole LoRA branch for one forward call with probability p.
    Both draw from the global RNG, which the training loop seeds every step (resume stays exact)."""
    def drop_ranks(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        keep = (torch.rand(output.shape[0], output.shape[1] if output.dim() == 4 else output.shape[-1]) > rank_dropout)
        keep = keep.to(output.device, output.dtype)
        if output.dim() == 4:  # conv: [B, rank, H, W]
            keep = keep[:, :, None, None]
        elif output.dim() == 3:  # tokens: [B, T, rank]
            keep = keep[:, None, :]
        return output * keep / (1.0 - rank_dropout)

    def drop_module(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if module.training and torch.rand(1).item() < module_dropout:
            return torch.zeros_like(output)
        return output

    for layer in _lora_layers(model).values():
        if rank_dropout:
            layer.lora_A[ADAPTER].register_forward_hook(drop_ranks)
        if module_dropout:
            layer.lora_B[ADAPTER].register_forward_hook(drop_module)


def scale_weight_norms(model: nn.Module, targets: list[Target], max_norm: float) -> list[tuple[bool, float]]:
    """sd-scripts' max-norm regularisation (apply_max_norm_regularization) after an optimizer step: each
    module's ΔW = up·down·alpha/rank with ‖ΔW‖ above `max_norm` has up and down scaled by √(max_norm/‖ΔW‖).
    Returns (scaled, norm after scaling) per module."""
    layers, found = _lora_layers(model), []
    with torch.no_grad():
        for target in targets:
            layer = layers[target.path]
            down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            delta_norm = lora_delta(down, up, float(layer.lora_alpha[ADAPTER])).norm()
            norm = delta_norm.clamp(min=max_norm / 2)
            ratio = (torch.clamp(norm, max=max_norm) / norm).item()
            if ratio != 1:
                down.mul_(ratio**0.5)
                up.mul_(ratio**0.5)
            found.append((ratio != 1, delta_norm.item() * ratio))
    return found


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def kohya_state_dict(model: nn.Module, targets: list[Target], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The injected LoRA weights under kohya names: lora_down / lora_up / alpha per module."""
    layers = _lora_layers(model)
    out = {}
    for target in targets:
        layer = layers[target.path]
        name = target.kohya_name
        out[f"{name}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=dtype)
    return out


def load_kohya_into(model: nn.Module, targets: list[Target], weights: dict[str, torch.Tensor]) -> int:
    """Copy kohya-named weights into injected layers (continue training from a file). Returns modules loaded.
    Raises ValueError when a file's rank does not match the configured network."""
    layers = _lora_layers(model)
    loaded = 0
    for target in targets:
        down = weights.get(f"{target.kohya_name}.lora_down.weight")
        up = weights.get(f"{target.kohya_name}.lora_up.weight")
        if down is None or up is None:
            continue
        layer = layers[target.path]
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if a.shape != down.shape or b.shape != up.shape:
            raise ValueError(
                f"{target.kohya_name}: file has rank {down.shape[0]}, the network is configured with rank "
                f"{a.shape[0]}; set network.rank / network.conv_rank to match the file"
            )
        with torch.no_grad():
            a.copy_(down)
            b.copy_(up)
        alpha = weights.get(f"{target.kohya_name}.alpha")
        if alpha is not None:
            layer.lora_alpha[ADAPTER] = float(alpha)
            layer.scaling[ADAPTER] = float(alpha) / down.shape[0]
        loaded += 1
    return loaded


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weight change a LoRA module makes (before the multiplier), shaped like the base weight."""
    rank = down.shape[0]
    scale = alpha / rank
    down32, up32 = down.float(), up.float()
    if down32.dim() == 2:
        return up32 @ down32 * scale
    if down32.shape[2:] == (1, 1):
        return (up32.flatten(1) @ down32.flatten(1)).reshape(up32.shape[0], down32.shape[1], 1, 1) * scale
    # 3x3 down followed by 1x1 up composes into one 3x3 kernel
    return torch.einsum("or,rihw->oihw", up32.flatten(1), down32) * scale


class LoraKind(NetworkKind):
    """kohya LoRA (`networks.lora`); LoCon is the same kind with network.conv_rank > 0."""

    name = "lora"
    file_marker = ".lora_down.weight"

    def inject(self, model: nn.Module, targets: list[Target], spec: NetworkSpec) -> None:
        add_lora(model, targets, spec)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return lora_parameters(model)

    def state_dict(self, model: nn.Module, targets: list[Target], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return kohya_state_dict(model, targets, dtype)

    def load_state_dict(self, model: nn.Module, targets: list[Target], weights: dict[str, torch.Tensor]) -> int:
        return load_kohya_into(model, targets, weights)

    def delta(self, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        down, up = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"]
        alpha = float(weights.get(f"{name}.alpha", torch.tensor(down.shape[0])))
        return lora_delta(down, up, alpha)

    def scale_weight_norms(self, model: nn.Module, targets: list[Target], max_norm: float) -> list[tuple[bool, float]]:
        return scale_weight_norms(model, targets, max_norm)

    def metadata(self, spec: NetworkSpec) -> dict[str, str]:
        args = {"conv_dim": str(spec.conv_rank), "conv_alpha": str(spec.conv_alpha)} if spec.conv_rank else {}
        if spec.dropout:
            args["dropout"] = str(spec.dropout)
        for key in ("rank_dropout", "module_dropout"):
            if getattr(spec, key):
                args[key] = str(getattr(spec, key))
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
                "ss_network_alpha": str(float(spec.alpha)), "ss_network_args": json.dumps(args),
                "ss_network_dropout": str(spec.dropout)}

    def describe(self, spec: NetworkSpec) -> str:
        conv = f", conv rank {spec.conv_rank} alpha {spec.conv_alpha:g}" if spec.conv_rank else ""
        drops = "".join(f", {key.replace('_', ' ')} {getattr(spec, key):g}" for key in ("rank_dropout", "module_dropout")
                        if getattr(spec, key))
        return f"LoRA rank {spec.rank} alpha {spec.alpha:g}{conv}{drops}"


LORA = LoraKind()
