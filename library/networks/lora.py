"""LoRA / LoCon networks: build with peft, save and load in the kohya key layout, merge into base weights.

peft does the injection, dropout, scaling (alpha / rank) and per-module ranks. What we write by hand is the
naming: kohya names are fixed strings other tools look up (REFERENCE.md), so they are built explicitly from
module paths — never derived from today's transformers attribute layout (transformers 5 dropped the
`text_model.` level that every kohya text-encoder key still carries).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from torch import nn

ADAPTER = "kiln"
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_text_model_"  # SD1/2; the `text_model_` part is what A1111/ComfyUI look for

# Module classes whose Linear / 1x1-conv children are adapted (sd-scripts' choice; what users' files contain).
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    conv_rank: int = 0  # 0 = attention/MLP only; >0 adds ResNet 3x3 convs (LoCon)
    conv_alpha: float = 1.0
    dropout: float = 0.0


@dataclass(frozen=True)
class Target:
    """One adaptable module: its path in the model, its kohya name, and whether it is a 3x3 conv."""

    path: str
    kohya_name: str
    is_conv3x3: bool


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


def _is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)


def find_targets(model: nn.Module, prefix: str, blocks: tuple[str, ...], conv_blocks: tuple[str, ...] = ()) -> list[Target]:
    """Adaptable modules inside blocks of the given class names, in module order."""
    targets: dict[str, Target] = {}
    for block_path, block in model.named_modules():
        block_class = type(block).__name__
        if block_class not in blocks and block_class not in conv_blocks:
            continue
        for child_path, child in block.named_modules():
            if not child_path:
                continue
            path = f"{block_path}.{child_path}"
            conv3 = _is_conv3x3(child) and block_class in conv_blocks
            if (_is_linear_like(child) or conv3) and path not in targets:
                targets[path] = Target(path, prefix + path.replace(".", "_"), conv3)
    return list(targets.values())


def unet_targets(unet: nn.Module, with_conv: bool) -> list[Target]:
    return find_targets(unet, UNET_PREFIX, UNET_ATTENTION_BLOCKS, UNET_CONV_BLOCKS if with_conv else ())


def text_encoder_targets(text_encoder: nn.Module) -> list[Target]:
    return find_targets(text_encoder, TE_PREFIX, TE_BLOCKS)


def add_lora(model: nn.Module, targets: list[Target], spec: LoraSpec) -> None:
    """Inject LoRA layers (peft) into `model`; only their weights are left trainable."""
    conv_paths = [t.path for t in targets if t.is_conv3x3]
    # peft matches pattern keys as regex suffixes of module names; anchor full paths so `conv1` ≠ `..._conv1`
    anchored = {rf"^{re.escape(p)}$": None for p in conv_paths}
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=[t.path for t in targets],
        rank_pattern={k: spec.conv_rank for k in anchored},
        alpha_pattern={k: spec.conv_alpha for k in anchored},
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)


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


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a kohya LoRA .safetensors file (ValueError naming the file if it is not one)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path} is not a readable .safetensors LoRA file ({err})") from None


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


def merge_lora(models: dict[str, nn.Module], weights: dict[str, torch.Tensor], multiplier: float = 1.0) -> list[str]:
    """Add a kohya LoRA into base weights in place: W += multiplier · up·down · alpha/rank.

    `models` maps a kohya prefix to its model, e.g. {UNET_PREFIX: unet, TE_PREFIX: text_encoder}.
    Returns the kohya module names the file has that matched nothing (so callers can warn)."""
    modules = {}
    for prefix, model in models.items():
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                modules[prefix + path.replace(".", "_")] = module
    names = sorted({k.split(".")[0] for k in weights if k.endswith(".lora_down.weight")})
    unmatched = []
    for name in names:
        module = modules.get(name)
        if module is None:
            unmatched.append(name)
            continue
        down, up = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"]
        alpha = float(weights.get(f"{name}.alpha", torch.tensor(down.shape[0])))
        delta = lora_delta(down, up, alpha) * multiplier
        with torch.no_grad():
            module.weight += delta.to(module.weight.dtype).reshape(module.weight.shape)
    return unmatched
