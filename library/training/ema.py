"""An exponential moving average of the trained weights ([ema], OneTrainer's EMA; sd-scripts has none).

Generic over any Trainable: it averages the tensors of `param_groups()` in order, so LoRA, embeddings, a full
fine-tune and any trainer added later get it alike. After optimizer step s (1-based), when s is a multiple of
`update_interval`:

    d = min(decay, (1 + s) / (10 + s))   with warmup (OneTrainer's), else decay
    ema ← ema + (1 − d) · (weight − ema)

The average is kept in fp32 (on the CPU with `device = "cpu"`), saved in the resumable state, and written to
files by swapping it into the weights for the save (as the result, or beside it as `<name>-ema.<ext>`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

EMA_SUFFIX = "-ema"


def ema_file_for(artifact: Path) -> Path:
    """Where `save_as = "beside"` writes the average of `artifact`: `<stem>-ema<suffix>`."""
    return artifact.with_name(artifact.stem + EMA_SUFFIX + artifact.suffix)


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """The decay used at optimizer step `step` (1-based)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class EMA:
    """The average of `params` (in their order); `device` None keeps it beside each weight."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, update_interval: int = 1,
                 warmup: bool = False, device: torch.device | str | None = None):
        self.params = list(params)
        self.decay = decay
        self.update_interval = update_interval
        self.warmup = warmup
        self.device = torch.device(device) if device is not None else None
        self.shadow: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        """Start the average at the current weights."""
        self.shadow = [p.detach().to(self.device or p.device, torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Fold the weights in after optimizer step `step` (1-based) when it is due; True when it was."""
        if step % self.update_interval:
            return False
        weight = 1.0 - ema_decay(step, self.decay, self.warmup)
        for average, param in zip(self.shadow, self.params):
            average.add_(param.detach().to(average.device, torch.float32) - average, alpha=weight)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{index}": average for index, average in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state written by state_dict; ValueError when it holds other tensors than these weights."""
        if len(state) != len(self.shadow) or any(
                tuple(state.get(f"ema.{i}", torch.empty(0)).shape) != tuple(a.shape) for i, a in enumerate(self.shadow)):
            raise ValueError("its EMA tensors do not match the trained weights (another network or model)")
        for index, average in enumerate(self.shadow):
            average.copy_(state[f"ema.{index}"])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in place of the weights for the block (to save it); the weights come back after."""
        live = [param.data for param in self.params]
        try:
            for param, average in zip(self.params, self.shadow):
                param.data = average.to(param.device, param.dtype)
            yield
        finally:
            for param, data in zip(self.params, live):
                param.data = data


def save_artifact(trainable, ema: EMA | None, save_as: str, path: Path, progress) -> None:
    """Write `trainable`'s artifact at `path`: with an EMA, as the result ("result") or also beside it."""
    if ema is None:
        trainable.save(path, progress)
    elif save_as == "result":
        with ema.applied():
            trainable.save(path, progress)
    else:
        trainable.save(path, progress)
        with ema.applied():
            trainable.save(ema_file_for(path), progress)
