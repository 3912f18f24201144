"""Reduce a kohya LoRA/LoCon file's rank by SVD, as sd-scripts' networks/resize_lora.py does.

Per module, ΔW = up·down·alpha/rank is cut to its top k singular values (the best rank-k approximation,
Eckart–Young). k is a fixed rank, or chosen per module from the singular values S (descending):
- sv_ratio X: keep the values above S[0] / X;
- sv_cumulative X: the fewest whose sum reaches the fraction X of ΣS;
- sv_fro X: the fewest whose Frobenius norm √ΣS² reaches the fraction X of the whole.
The rank (and conv rank, for 3x3 convolutions) caps k; no module grows. The new alpha is
old_alpha / old_rank × k, so alpha/rank — the scale tools apply — is unchanged and the file applies the
truncated ΔW at the weights users already use.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from library.networks.extract import decompose, kohya_shapes, split_factors
from library.networks.lora import LORA

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # below this the whole module is numerically zero: keep rank 1 (sd-scripts' rule)
STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")  # hashes of the old tensors


@dataclass(frozen=True)
class ResizeSettings:
    """rank: the fixed rank, or the cap in dynamic mode (None: each module's own rank); conv_rank: the same for
    3x3 convolutions (None: rank); dynamic: one of DYNAMIC_METHODS or None, with dynamic_param."""

    rank: int | None = None
    conv_rank: int | None = None
    dynamic: str | None = None
    dynamic_param: float = 0.0


@dataclass(frozen=True)
class ModuleResize:
    """What resizing did to one module; retained fractions are of ΣS and of the Frobenius norm √ΣS²."""

    name: str
    is_conv3x3: bool
    old_rank: int
    new_rank: int
    alpha: float
    sum_retained: float
    fro_retained: float

    def line(self) -> str:
        return (f"{self.name}: rank {self.old_rank} → {self.new_rank}, alpha {self.alpha:g}; retained "
                f"{self.fro_retained:.1%} of the Frobenius norm, {self.sum_retained:.1%} of sum(S)")


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """The rank `method` keeps of singular values `s` (descending), with sd-scripts' definitions."""
    if method == "sv_ratio":
        count = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        count = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(param, dtype=s.dtype))) + 1
    elif method == "sv_fro":
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        count = int(torch.searchsorted(energy, torch.tensor(param**2, dtype=s.dtype))) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}; known: {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(count, s.shape[0]))


def _module_rank(s: torch.Tensor, old_rank: int, cap: int | None, settings: ResizeSettings) -> int:
    if s[0] <= MIN_SV:
        return 1
    k = dynamic_rank(s, settings.dynamic, settings.dynamic_param) if settings.dynamic else old_rank
    return min(k, cap or old_rank, old_rank)


def resize_module(weights: dict[str, torch.Tensor], name: str, settings: ResizeSettings, device: torch.device,
                  dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], ModuleResize]:
    """The resized tensors of kohya module `name` (dtype None: the file's) and what was kept."""
    down, up = weights[f"{name}.lora_down.weight"], weights[f"{name}.lora_up.weight"]
    old_rank = down.shape[0]
    alpha = float(weights.get(f"{name}.alpha", torch.tensor(float(old_rank))))
    is_conv3x3 = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
    cap = (settings.conv_rank or settings.rank) if is_conv3x3 else settings.rank
    # the unscaled product: alpha/rank is carried over unchanged, so its SVD is the scaled ΔW's too
    product = LORA.delta({f"{name}.lora_down.weight": down.to(device), f"{name}.lora_up.weight": up.to(device),
                          f"{name}.alpha": torch.tensor(float(old_rank))}, name)
    u, s, vh = decompose(product)
    s = s[:old_rank]  # a rank-r product has r singular values; the rest is rounding noise
    k = min(_module_rank(s, old_rank, cap, settings), s.shape[0])
    new_up, new_down = kohya_shapes((up.shape[0], *down.shape[1:]), *split_factors(u, s, vh, k))
    new_alpha = alpha / old_rank * k
    out_dtype = dtype or down.dtype
    total = float(s.sum())
    result = ModuleResize(name, is_conv3x3, old_rank, k, new_alpha,
                          float(s[:k].sum()) / total if total else 1.0,
                          math.sqrt(float((s[:k] ** 2).sum()) / float((s**2).sum())) if total else 1.0)
    return {f"{name}.lora_down.weight": new_down.to("cpu", out_dtype).contiguous(),
            f"{name}.lora_up.weight": new_up.to("cpu", out_dtype).contiguous(),
            f"{name}.alpha": torch.tensor(new_alpha, dtype=out_dtype)}, result


def resize_lora(weights: dict[str, torch.Tensor], settings: ResizeSettings, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[ModuleResize]]:
    """Every LoRA module of `weights` resized; other tensors are copied unchanged. ValueError when the file
    holds no kohya LoRA modules."""
    names = LORA.module_names(weights)
    if not names:
        raise ValueError("it holds no kohya LoRA modules (*.lora_down.weight / *.lora_up.weight); resize_lora.py "
                         "reduces LoRA/LoCon files")
    out = dict(weights)
    results = []
    for name in names:
        tensors, result = resize_module(weights, name, settings, torch.device(device), dtype)
        out.update(tensors)
        results.append(result)
    return out, results


def _single(values: list[float]) -> str:
    return f"{values[0]:g}" if values and all(v == values[0] for v in values) else "Dynamic"


def resized_metadata(metadata: dict[str, str], settings: ResizeSettings, results: list[ModuleResize]
                     ) -> dict[str, str]:
    """The file's metadata with sd-scripts' resize entries: ss_network_dim / alpha ("Dynamic" when ranks vary
    per module), conv_dim / conv_alpha in ss_network_args, a training comment; stale hashes dropped."""
    out = {k: v for k, v in metadata.items() if k not in STALE_KEYS}
    old_max = max(r.old_rank for r in results)
    previous = metadata.get("ss_training_comment", "")
    linear = [r for r in results if not r.is_conv3x3]
    conv = [r for r in results if r.is_conv3x3]
    if settings.dynamic:
        comment = f"Dynamic resize with {settings.dynamic}: {settings.dynamic_param:g} from {old_max}"
        out["ss_network_dim"] = out["ss_network_alpha"] = "Dynamic"
    else:
        conv_note = f" (conv: {settings.conv_rank})" if settings.conv_rank not in (None, settings.rank) else ""
        comment = f"dimension is resized from {old_max} to {settings.rank}{conv_note}"
        out["ss_network_dim"] = str(settings.rank)
        out["ss_network_alpha"] = _single([r.alpha for r in linear])
    out["ss_training_comment"] = f"{comment}; {previous}" if previous else comment
    try:
        args = json.loads(metadata.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        args = None
    if isinstance(args, dict) and conv and "conv_dim" in args:
        args["conv_dim"] = _single([float(r.new_rank) for r in conv])
        args["conv_alpha"] = _single([r.alpha for r in conv])
        out["ss_network_args"] = json.dumps(args)
    return out
