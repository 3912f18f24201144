"""A network (any kind in kinds.py) on the UNet and/or text encoders as a `Trainable` for the shared loop."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from library.models.parts import ModelParts
from library.networks.base import NetworkKind, NetworkSpec, Target
from library.networks.blocks import BlockSettings, split_targets
from library.networks.kinds import kind_of_weights
from library.networks.merge import read_network_file
from library.networks.metadata import safetensors_hashes
from library.networks.targets import UNET_GROUP, network_targets
from library.training.checkpoints import Progress, atomic_save_safetensors


@dataclass
class TrainedPart:
    """One model the network adapts: its learning-rate group name, the model, its targets and rate."""

    group: str
    model: nn.Module
    targets: list[Target]
    lr: float
    blocks: list[int | None] | None = None  # each target's UNet block, when block lr weights are set


class NetworkTrainable:
    """Injects the network into the parts named in `lrs` ({"unet": lr, "text_encoder": lr}; SDXL names one
    group per text encoder) and saves it in its file layout with the run's metadata. `blocks`: sd-scripts'
    block-wise settings for the UNet (per-block rates, ranks, alphas); `max_norm`: scale_weight_norms."""

    artifact_suffix = ".safetensors"
    saves_base_model = False

    def __init__(self, parts: ModelParts, kind: NetworkKind, spec: NetworkSpec, lrs: dict[str, float], seed: int,
                 save_dtype: torch.dtype, metadata: dict[str, str], blocks: BlockSettings | None = None,
                 max_norm: float = 0.0):
        self.kind = kind
        self.save_dtype = save_dtype
        self.metadata = metadata
        self.max_norm = max_norm
        self.block_names = parts.family.unet_block_names() if blocks is not None else []
        for model in (parts.unet, *parts.text_encoders):
            model.requires_grad_(False)
        # peft draws the initial weights from the global RNG: seed it so the same config gives the same run
        torch.manual_seed(seed)
        self.parts: list[TrainedPart] = []
        for group, model, targets in network_targets(parts, lrs, with_conv=spec.conv_rank > 0):
            part_blocks = None
            if group == UNET_GROUP and blocks is not None and blocks.active:
                found = [parts.family.unet_block_index(t.path) for t in targets]
                targets, ranks = split_targets(targets, found, blocks, spec.alpha, spec.conv_alpha)
                spec = dataclasses.replace(spec, target_ranks=tuple(ranks))
                weights = blocks.lr_weights
                part_blocks = [parts.family.unet_block_index(t.path) for t in targets] if weights else None
            kind.inject(model, targets, spec)
            self.parts.append(TrainedPart(group, model, targets, lrs[group], part_blocks))
        self.spec = spec
        self.block_weights = blocks.lr_weights if blocks is not None else None
        self.trains_text_encoder = any(part.group != UNET_GROUP for part in self.parts)

    def start_from(self, path: str) -> str:
        """Load an existing file of this kind as the starting weights (network.init_weights); returns the line
        to print. ValueError when it matches nothing or was trained with another alpha."""
        weights, _ = read_network_file(path)
        if (found := kind_of_weights(weights)) not in (None, self.kind):
            raise ValueError(f"network.init_weights: {path} is a {found.name} file but network.type = "
                             f"\"{self.kind.name}\"; set network.type = \"{found.name}\" to continue from it")
        # the alphas the configured network has, per module, before the file's are loaded into it
        expected = {k: float(v) for k, v in self.file_tensors(torch.float32).items() if k.endswith(".alpha")}
        count = sum(self.kind.load_state_dict(p.model, p.targets, weights) for p in self.parts)
        if count == 0:
            raise ValueError(f"network.init_weights: no module of {path} matches this network (another model "
                             "family, or conv layers with network.conv_rank = 0?)")
        differing = sorted({round(float(v), 6) for k, v in weights.items()
                            if k in expected and not math.isclose(float(v), expected[k], rel_tol=1e-3)})
        if differing:
            spec = self.spec
            raise ValueError(f"network.init_weights: the file's alpha {differing} differs from "
                             f"network.alpha {spec.alpha:g} / conv_alpha {spec.conv_alpha:g}; set them to match")
        return f"network: started from {path} ({count} modules loaded)"

    def describe(self) -> str:
        counts = ", ".join(f"{p.group}: {len(p.targets)} modules" for p in self.parts)
        params = sum(p.numel() for g in self.param_groups() for p in g["params"])
        return f"network: {self.kind.describe(self.spec)} ({counts}; {params:,} parameters)"

    def param_groups(self) -> list[dict]:
        """One group per trained part; with block lr weights, the UNet's split into one group per block
        (named unet_IN01, unet_MID, ... for the logs) at the UNet rate × the block's weight."""
        groups = []
        for part in self.parts:
            if part.blocks is None:
                groups.append({"params": self.kind.parameters(part.model), "lr": part.lr, "name": part.group})
                continue
            by_block: dict[int, list[nn.Parameter]] = {}
            for target, block in zip(part.targets, part.blocks):
                module = part.model.get_submodule(target.path)
                by_block.setdefault(block, []).extend(p for p in module.parameters() if p.requires_grad)
            groups += [{"params": params, "lr": part.lr * self.block_weights[block],
                        "name": f"{part.group}_{self.block_names[block]}"} for block, params in sorted(by_block.items())]
        return groups

    def set_train(self, training: bool) -> None:
        for part in self.parts:
            part.model.train(training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.file_tensors(torch.float32)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for part in self.parts:
            self.kind.load_state_dict(part.model, part.targets, state)

    def after_backward(self) -> None:
        pass

    def after_optimizer_step(self) -> dict[str, float]:
        """network.scale_weight_norms after each optimizer step; TensorBoard values as sd-scripts logs them."""
        if not self.max_norm:
            return {}
        found = [item for part in self.parts for item in self.kind.scale_weight_norms(part.model, part.targets,
                                                                                       self.max_norm)]
        norms = [norm for _, norm in found]
        return {"max_norm/keys_scaled": float(sum(scaled for scaled, _ in found)),
                "max_norm/average_key_norm": sum(norms) / max(len(norms), 1),
                "max_norm/max_key_norm": max(norms, default=0.0)}

    def file_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for part in self.parts:
            out.update(self.kind.state_dict(part.model, part.targets, dtype))
        return out

    def save(self, path: Path, progress: Progress) -> None:
        metadata = {**self.metadata, "ss_steps": str(progress.global_step), "ss_epoch": str(progress.epoch),
                    "ss_training_finished_at": str(int(time.time()))}
        tensors = self.file_tensors(self.save_dtype)
        atomic_save_safetensors(tensors, path, {**metadata, **safetensors_hashes(tensors, metadata)})
