"""A loss that turns NaN or infinite: stop with one line that says where and with which settings
(train.nan_policy = "stop"), or skip the batch, up to train.nan_skip_limit batches ("skip")."""
from __future__ import annotations

from pathlib import Path

from library.errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN/inf: the message names the step, the learning rates in effect, the precision and the
    last good save."""


class NanGuard:
    """Decides what a non-finite loss does; counts the skipped batches (kept in the training state, so a resumed
    run counts on)."""

    def __init__(self, policy: str, limit: int, lr_settings: tuple[str, ...], precision: str):
        self.policy = policy
        self.limit = limit
        self.lr_settings = lr_settings
        self.precision = precision
        self.skipped = 0

    def on_bad_loss(self, step: int, epoch: int, last_good: Path | None) -> str:
        """The line to log for a skipped batch; raises TrainingDiverged when the run must stop."""
        if self.policy == "skip" and self.skipped < self.limit:
            self.skipped += 1
            return (f"step {step}: the loss is NaN/inf, batch skipped ({self.skipped} of at most {self.limit}: "
                    "train.nan_skip_limit)")
        raise TrainingDiverged(self.message(step, epoch, last_good))

    def message(self, step: int, epoch: int, last_good: Path | None) -> str:
        if self.policy == "skip":
            what = f"the loss was NaN/inf in more than train.nan_skip_limit = {self.limit} batches, the last at step {step}"
        else:
            what = f"the loss became NaN/inf at step {step}"
        rates = ", ".join(self.lr_settings) or "?"
        precision = f"train.mixed_precision = '{self.precision}'"
        advice = "lower the learning rate"
        if self.precision == "fp16":
            advice += ", or use train.mixed_precision = 'bf16' (or 'no'): fp16 overflows easily"
        if self.policy == "stop":
            advice += "; train.nan_policy = 'skip' skips such batches instead"
        good = f"last good save: {last_good}" if last_good else "nothing was saved before it"
        return f"{what} (epoch {epoch + 1}); learning rates: {rates}; precision: {precision}; {good}. To fix: {advice}"
