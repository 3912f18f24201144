"""sd-scripts' block-wise network settings (networks/lora.py, given there as --network_args): learning-rate
weights per UNet block (down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold) and ranks and
alphas per block (block_dims, block_alphas, conv_block_dims, conv_block_alphas). The blocks and which UNet
module lies in which come from the model family (ModelFamily.unet_block_layout / unet_block_index).

Semantics, as sd-scripts: a weight list is padded with 1.0 or cut to the block count; a string is a comma list,
or a preset `sine`, `cosine`, `linear`, `reverse_linear`, `zeros`, optionally `+base` (e.g. "sine+0.5"); a
weight at or below block_lr_zero_threshold becomes 0, and a block of weight 0 gets no modules at all; each
block's rate is the UNet rate × its weight. Text encoders are never affected. Pure (no torch): the config
checks use it too."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from library.networks.base import Target

PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
WeightValue = str | float | list[float] | None


def preset_weights(text: str, count: int) -> list[float]:
    """A preset list of `count` weights ("sine", "cosine+0.2", ...); ValueError for an unknown name."""
    name, _, base_text = text.strip().partition("+")
    base = float(base_text) if base_text else 0.0
    steps = [i / (count - 1) if count > 1 else 1.0 for i in range(count)]
    curves = {"sine": [math.sin(math.pi * s / 2) for s in steps], "linear": steps,
              "zeros": [0.0] * count}
    curves["cosine"] = list(reversed(curves["sine"]))
    curves["reverse_linear"] = list(reversed(steps))
    if name not in curves:
        raise ValueError(f"{text!r} is neither a comma list of numbers nor a preset ({', '.join(PRESETS)}, "
                         "optionally +base, e.g. \"sine+0.5\")")
    return [value + base for value in curves[name]]


def parse_weights(value: WeightValue, count: int, presets: bool = True) -> list[float] | None:
    """A weight list of exactly `count` values (padded with 1.0, cut), from a list, a comma string or (when
    `presets`) a preset name; None when unset. ValueError says what is wrong."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        weights = [float(value)]
    elif isinstance(value, str):
        if "," in value or not presets:
            try:
                weights = [float(part) if part.strip() else 0.0 for part in value.split(",")]
            except ValueError:
                raise ValueError(f"{value!r} is not a comma list of numbers") from None
        else:
            weights = preset_weights(value, count)
    else:
        weights = [float(v) for v in value]
    return (weights + [1.0] * count)[:count]


def parse_ints(value: str | list[int] | None) -> list[int] | None:
    """block_dims as a list, or sd-scripts' comma string "4,4,8,..."."""
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise ValueError(f"{value!r} is not a comma list of whole numbers") from None


def parse_floats(value: str | list[float] | None) -> list[float] | None:
    """block_alphas as a list, or sd-scripts' comma string "2,2,4,..."."""
    if value is None or isinstance(value, list):
        return None if value is None else [float(v) for v in value]
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise ValueError(f"{value!r} is not a comma list of numbers") from None


@dataclass(frozen=True)
class BlockSettings:
    """Block-wise settings resolved for one family's blocks (None: not set)."""

    lr_weights: tuple[float, ...] | None = None
    dims: tuple[int, ...] | None = None
    alphas: tuple[float, ...] | None = None
    conv_dims: tuple[int, ...] | None = None
    conv_alphas: tuple[float, ...] | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.lr_weights, self.dims, self.conv_dims))


def block_lr_weights(layout: tuple[int, int, int, int, int], down: WeightValue, mid: WeightValue,
                     up: WeightValue, zero_threshold: float = 0.0) -> list[float] | None:
    """One learning-rate weight per block (None when no weight is set), as sd-scripts' get_block_lr_weight."""
    before, n_down, n_mid, n_up, after = layout
    if down is None and mid is None and up is None:
        return None
    lists = [parse_weights(down, n_down) or [1.0] * n_down, parse_weights(mid, n_mid, presets=False) or [1.0] * n_mid,
             parse_weights(up, n_up) or [1.0] * n_up]
    kept = [w if w > zero_threshold else 0.0 for part in lists for w in part]
    return [1.0] * before + kept + [1.0] * after


def count_problems(names: Sequence[str], values: dict[str, list | None]) -> list[str]:
    """`network.<key>` lists whose length is not the family's block count."""
    return [f"network.{key} has {len(value)} values, but this model's UNet has {len(names)} blocks "
            f"({names[0]} … {names[-1]}): give one per block" for key, value in values.items()
            if value is not None and len(value) != len(names)]


def split_targets(targets: list["Target"], blocks: list[int | None], settings: BlockSettings, alpha: float,
                  conv_alpha: float) -> tuple[list["Target"], list[tuple[str, int, float]]]:
    """The targets that keep a module (a block of lr weight 0 or dim 0 has none) and each kept target's
    (path, rank, alpha) where block dims set it (block_alphas default to network.alpha, conv_block_alphas to
    network.conv_alpha, as in sd-scripts)."""
    kept, ranks = [], []
    for target, block in zip(targets, blocks):
        if block is None:
            kept.append(target)
            continue
        if settings.lr_weights is not None and settings.lr_weights[block] == 0:
            continue
        dims, alphas = ((settings.conv_dims, settings.conv_alphas) if target.is_conv3x3
                        else (settings.dims, settings.alphas))
        if dims is None:
            kept.append(target)
            continue
        if dims[block] == 0:
            continue
        default_alpha = conv_alpha if target.is_conv3x3 else alpha
        kept.append(target)
        ranks.append((target.path, dims[block], alphas[block] if alphas is not None else default_alpha))
    return kept, ranks
