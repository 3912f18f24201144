"""A hypernetwork as the loop's `Trainable`: its MLPs are the only trained tensors; the model stays frozen (and in
eval mode, as A1111 keeps it); every save is A1111's `.pt`."""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.parts import ModelParts
from library.networks.hypernetwork import Hypernetwork, attach, save_hypernetwork
from library.training.checkpoints import Progress


class HypernetworkTrainable:
    artifact_suffix = ".pt"
    trains_text_encoder = False  # the text encoder only feeds the context; no gradient flows into it
    saves_base_model = False

    def __init__(self, parts: ModelParts, network: Hypernetwork, lr: float, save_dtype: torch.dtype = torch.float32):
        self.parts = parts
        self.network = network
        self.lr = lr
        self.save_dtype = save_dtype
        self.checkpoint_name = network.sd_checkpoint_name
        self.checkpoint_hash = network.sd_checkpoint
        for module in parts.networks():
            module.requires_grad_(False)
        network.requires_grad_(True)
        self.attached = attach(parts, network, strength=1.0)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.network.parameters()), "lr": self.lr, "name": "hypernetwork"}]

    def set_train(self, training: bool) -> None:
        self.network.train(training)  # dropout, and strength 1 while training (A1111's rule)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().clone() for key, value in self.network.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(state)

    def after_backward(self) -> None:
        pass  # only the MLPs are parameters: nothing else to mask

    def save(self, path: Path, progress: Progress) -> None:
        """A1111's file: `step` = optimizer steps done, `name` = the hypernetwork's (A1111 keeps it for copies)."""
        self.network.step = progress.global_step
        save_hypernetwork(self.network, path, self.save_dtype)

    def describe(self) -> str:
        widths = ", ".join(f"{width} ({count} attention layer{'s' * (count != 1)})"
                           for width, count in sorted(self.attached.layers.items()))
        return (f"hypernetwork {self.network.name!r}: {self.network.spec.describe()}; "
                f"{self.network.parameter_count():,} trained values; rewrites key/value inputs at widths {widths}")
