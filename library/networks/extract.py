"""LoRA from a fine-tuned model: the per-module weight difference to its base model, reduced to a chosen rank
by SVD and written in the kohya layout (library/lora.py names) that A1111, ComfyUI and diffusers load.

Each module's difference ΔW [out, in(·k·k)] = U S Vᵀ is cut to the top `rank` singular values; the singular
values are split evenly between the two factors (up = U·√S, down = √S·Vᵀ) and alpha = rank, so the file
applies at weight 1 exactly what the truncated SVD approximates.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
from torch import nn

from library.errors import UserError
from library.models.parts import ModelParts
from library.networks.base import NetworkSpec, Target
from library.networks.lora import LORA
from library.networks.metadata import model_metadata
from library.networks.targets import text_encoder_targets, unet_targets

# Below this largest absolute weight change a text encoder counts as unchanged (DreamBooth runs that froze
# it), as sd-scripts decides; an unchanged part is left out of the file instead of written as zeros.
UNCHANGED = 1e-6


class ExtractError(UserError, ValueError):
    """The two models cannot be compared module by module; the message says why."""


@dataclass(frozen=True)
class ExtractSettings:
    rank: int
    conv_rank: int = 0  # 0 = no 3x3 convolutions (plain LoRA); >0 = LoCon
    clamp_quantile: float | None = None  # e.g. 0.99 clamps factor outliers as sd-scripts does; None = off


def _matrix(delta: torch.Tensor) -> torch.Tensor:
    """A weight difference as a 2-D matrix [out, in·k·k] (Linear, 1x1 and 3x3 convolutions alike)."""
    return delta.reshape(delta.shape[0], -1)


def decompose(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (u, s, vh) of a weight difference as a matrix [out, in·k·k], in fp32, singular values descending."""
    return torch.linalg.svd(_matrix(delta).float(), full_matrices=False)


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in·k·k]) of the top r = min(rank, len(s)) singular triplets, the singular values
    split evenly between the two (up @ down is the best rank-r approximation)."""
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def low_rank_factors(delta: torch.Tensor, rank: int, clamp_quantile: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in·k·k]) with up @ down ≈ delta, r = min(rank, out, in·k·k)."""
    up, down = split_factors(*decompose(delta), rank)
    if clamp_quantile is not None and clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()]).abs()
        # kthvalue, not torch.quantile, which refuses inputs above 16M values
        limit = values.kthvalue(max(1, round(clamp_quantile * values.numel()))).values
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    return up, down


def kohya_shapes(weight_shape: torch.Size | tuple, up: torch.Tensor, down: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape factors as kohya stores them for a weight of `weight_shape`: Linear [r, in] / [out, r]; conv
    down [r, in, k, k], up [out, r, 1, 1]."""
    if len(weight_shape) == 4:
        down = down.reshape(down.shape[0], *weight_shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    return up, down


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _extract_part(tuned: nn.Module, base: nn.Module, targets: list[Target], settings: ExtractSettings,
                  device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tuned_weights, base_weights = _weights(tuned), _weights(base)
    deltas = {}
    for target in targets:
        key = f"{target.path}.weight"
        if key not in base_weights or tuned_weights[key].shape != base_weights[key].shape:
            raise ExtractError(f"{target.path}: the fine-tuned and base models differ in shape there; extract from "
                             "the model the fine-tune started from")
        deltas[target] = tuned_weights[key].detach().to(device, torch.float32) - base_weights[key].detach().to(
            device, torch.float32)
    if max((d.abs().max().item() for d in deltas.values()), default=0.0) <= UNCHANGED:
        return {}
    out = {}
    for target, delta in deltas.items():
        rank = settings.conv_rank if target.is_conv3x3 else settings.rank
        up, down = low_rank_factors(delta, rank, settings.clamp_quantile)
        up, down = kohya_shapes(base.get_submodule(target.path).weight.shape, up, down)
        out[f"{target.kohya_name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
        out[f"{target.kohya_name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
        out[f"{target.kohya_name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)  # alpha = rank: scale 1
    return out


def extract_lora(tuned: ModelParts, base: ModelParts, settings: ExtractSettings,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float16
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """kohya LoRA tensors approximating `tuned − base`, and the parts found changed ("unet", "text_encoder").

    All of a part's modules are written or none: diffusers mis-reads text-encoder LoRAs that adapt only some
    projections (REFERENCE.md)."""
    if (tuned.family, _config_of(tuned)) != (base.family, _config_of(base)):
        raise ExtractError(f"the models have different architectures ({tuned.source}: {tuned.family.label}, "
                         f"{base.source}: {base.family.label}); extract from the model the fine-tune started from")
    device = torch.device(device)
    tensors: dict[str, torch.Tensor] = {}
    changed = []
    parts = [("unet", tuned.unet, base.unet, unet_targets(base, with_conv=settings.conv_rank > 0))]
    parts += [(slot.group, tuned.text_encoders[i], base.text_encoders[i], text_encoder_targets(base, i))
              for i, slot in enumerate(base.family.text_encoders)]
    for name, tuned_model, base_model, targets in parts:
        found = _extract_part(tuned_model, base_model, targets, settings, device, dtype)
        if found:
            changed.append(name)
            tensors.update(found)
    return tensors, changed


def _config_of(parts: ModelParts) -> str:
    # private entries (_name_or_path, _diffusers_version, ...) say nothing about the architecture
    return json.dumps({k: v for k, v in parts.unet.config.items() if not k.startswith("_")}, sort_keys=True,
                      default=str)


def extract_metadata(tuned: ModelParts, base: ModelParts, settings: ExtractSettings, changed: list[str]
                     ) -> dict[str, str]:
    """The `ss_*` / `modelspec.*` strings LoRA tools show, as sd-scripts' extract_lora_from_models writes them."""
    # alpha = rank everywhere: the file applies exactly the truncated SVD at weight 1
    spec = NetworkSpec(settings.rank, float(settings.rank), settings.conv_rank, float(settings.conv_rank))
    return {
        **LORA.metadata(spec),
        "ss_training_comment": f"extracted from {tuned.source} minus {base.source} by SVD "
                               f"({' and '.join(changed) or 'no changes'})",
        "ss_training_started_at": str(int(time.time())),
        **model_metadata(base, f"{tuned.source} (extracted LoRA)"),
        "ss_sd_model_name": base.source,
    }
