"""Step arithmetic: samples per epoch → batches → optimizer steps → epochs, shown to the user with the sums."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingPlan:
    train_samples: int  # training images × repeats
    reg_samples: int  # regularisation images × (balanced) repeats
    batch_size: int
    batches_per_epoch: int  # ceil(samples / batch size), or more when buckets leave partial batches
    accumulation: int
    epochs: int
    total_steps: int  # optimizer steps
    done: int = 0  # steps a resumed run has already taken

    @property
    def samples_per_epoch(self) -> int:
        return self.train_samples + self.reg_samples

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulation)

    def lines(self) -> list[str]:
        """The arithmetic, one line each, as printed before training and by --check."""
        samples = f"{self.train_samples} training samples"
        if self.reg_samples:
            samples += f" + {self.reg_samples} regularisation samples = {self.samples_per_epoch} samples"
        lines = [
            f"samples per epoch : {samples}",
            f"batches per epoch : ceil({self.samples_per_epoch} / batch size {self.batch_size}) = {self.batches_per_epoch}"
            if self.batches_per_epoch == math.ceil(self.samples_per_epoch / self.batch_size) else
            f"batches per epoch : {self.batches_per_epoch} (batch size {self.batch_size}; a batch never mixes sizes)",
        ]
        if self.accumulation > 1:
            lines.append(
                f"steps per epoch   : ceil({self.batches_per_epoch} / gradient accumulation {self.accumulation})"
                f" = {self.steps_per_epoch} optimizer steps"
            )
        else:
            lines.append(f"steps per epoch   : {self.steps_per_epoch}")
        if self.total_steps == self.epochs * self.steps_per_epoch:
            lines.append(f"total steps       : {self.epochs} epochs × {self.steps_per_epoch} = {self.total_steps}")
        else:
            lines.append(
                f"total steps       : {self.total_steps} (max_steps) → ceil({self.total_steps} / "
                f"{self.steps_per_epoch}) = {self.epochs} epoch(s), the last one partial"
            )
        if self.done:
            lines.append(f"resumed           : {self.done} steps done, {max(self.total_steps - self.done, 0)} to go")
        return lines


def make_plan(train_samples: int, reg_samples: int, batch_size: int, batches_per_epoch: int, accumulation: int,
              max_steps: int | None, epochs: int | None) -> TrainingPlan:
    """Resolve epochs ↔ steps from whichever one the config set."""
    if train_samples <= 0:
        raise ValueError("the dataset has no training samples")
    per_epoch = math.ceil(batches_per_epoch / accumulation)
    if max_steps is not None:
        epochs, total = math.ceil(max_steps / per_epoch), max_steps
    else:
        assert epochs is not None
        total = epochs * per_epoch
    return TrainingPlan(train_samples, reg_samples, batch_size, batches_per_epoch, accumulation, epochs, total)
