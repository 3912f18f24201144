"""What the loop trains (a `Trainable`, built by a recipe) and where a run starts when it does not start at
step 0 from scratch (a `StartPoint`: textual inversion continuing an embedding file, for example)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from library.training.checkpoints import Progress


class Trainable(Protocol):
    """What a recipe trains. The loop only needs these."""

    artifact_suffix: str
    trains_text_encoder: bool
    saves_base_model: bool  # the artifact is the whole model, VAE included (DreamBooth)

    def param_groups(self) -> list[dict]:
        """[{"params": [...], "lr": float, "name": "unet"}, ...]"""

    def set_train(self, training: bool) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, path: Path, progress: Progress) -> None:
        """Write the artifact users load (atomically)."""

    def after_backward(self) -> None:
        """Adjust gradients before the optimizer step."""


@dataclass
class StartPoint:
    """Progress to start from, and an optimizer state to load (None: the optimizer starts fresh)."""

    progress: Progress
    optimizer_state: dict | None = None
