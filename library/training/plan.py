"""Step arithmetic: samples per epoch → batches → optimizer steps → epochs, shown to the user with the sums;
and repeats that reach a target step count (`--suggest-repeats`)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FolderCount:
    """One training folder as the plan shows it: `label` is how the user finds it (folder name or subset)."""

    label: str
    images: int
    repeats: int
    how_to_change: str = ""  # what sets its repeats: "rename it to {}" or "set dataset.subsets[0].repeats = {}"


@dataclass(frozen=True)
class TrainingPlan:
    train_samples: int  # training images × repeats
    reg_samples: int  # regularisation images × (balanced) repeats
    batch_size: int
    batches_per_epoch: int  # ceil(samples / batch size), or more when buckets leave partial batches
    accumulation: int
    epochs: int
    total_steps: int  # optimizer steps
    folders: tuple[FolderCount, ...] = ()  # the training folders behind train_samples, for the explanation
    done: int = 0  # steps a resumed run has already taken
    processes: int = 1  # data-parallel processes sharing every batch (accelerate launch --num_processes)

    @property
    def samples_per_epoch(self) -> int:
        return self.train_samples + self.reg_samples

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.accumulation)

    def lines(self) -> list[str]:
        """The arithmetic, one line each, as printed before training and by --check."""
        samples = f"{self.train_samples} training samples"
        if self.folders:
            terms = " + ".join(f"{f.images} images × {f.repeats} repeats" if len(self.folders) == 1 else
                               f"{f.images} × {f.repeats}" for f in self.folders)
            samples = f"{terms} = {samples}"
        if self.reg_samples:
            samples += f" + {self.reg_samples} regularisation samples = {self.samples_per_epoch} samples"
        lines = [
            f"samples per epoch : {samples}",
            f"batches per epoch : ceil({self.samples_per_epoch} / batch size {self.batch_size}) = {self.batches_per_epoch}"
            if self.batches_per_epoch == math.ceil(self.samples_per_epoch / self.batch_size) else
            f"batches per epoch : {self.batches_per_epoch} (batch size {self.batch_size}; a batch never mixes sizes)",
        ]
        if self.processes > 1:
            lines.append(f"processes         : data-parallel on {self.processes} processes, each takes "
                         f"{self.batch_size // self.processes} of every batch of {self.batch_size} (train.batch_size "
                         "is the global batch)")
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
              max_steps: int | None, epochs: int | None, folders: tuple[FolderCount, ...] = (),
              processes: int = 1) -> TrainingPlan:
    """Resolve epochs ↔ steps from whichever one the config set; `processes` share every batch (the step
    arithmetic is the same on any number)."""
    if train_samples <= 0:
        raise ValueError("the dataset has no training samples")
    per_epoch = math.ceil(batches_per_epoch / accumulation)
    if max_steps is not None:
        epochs, total = math.ceil(max_steps / per_epoch), max_steps
    else:
        assert epochs is not None
        total = epochs * per_epoch
    return TrainingPlan(train_samples, reg_samples, batch_size, batches_per_epoch, accumulation, epochs, total,
                        folders, processes=processes)


def _steps_for(plan: TrainingPlan, repeats: list[int], own_reg: int, epochs: int) -> tuple[int, int]:
    """(samples per epoch, total steps) with these training repeats; reg samples are raised to match the training
    samples as the run does (never lowered)."""
    train = sum(f.images * r for f, r in zip(plan.folders, repeats))
    samples = train + (max(own_reg, train) if own_reg else 0)
    return samples, epochs * math.ceil(math.ceil(samples / plan.batch_size) / plan.accumulation)


def _best_repeats(plan: TrainingPlan, target: int, own_reg: int, epochs: int) -> list[int]:
    """The repeats, all folders scaled by one factor (their ratio kept), whose step count is nearest `target`
    (the fewer steps on a tie). Candidates: each folder's repeats around the factor the arithmetic asks for."""
    per_epoch = target / epochs * plan.batch_size * plan.accumulation / (2 if own_reg else 1)
    weight = sum(f.images * f.repeats for f in plan.folders)
    factor = per_epoch / weight
    candidates = {factor}
    for folder in plan.folders:
        middle = round(factor * folder.repeats)
        candidates.update(m / folder.repeats for m in range(max(1, middle - 3), middle + 4))
    best: tuple | None = None
    for k in sorted(candidates):
        repeats = [max(1, round(k * f.repeats)) for f in plan.folders]
        steps = _steps_for(plan, repeats, own_reg, epochs)[1]
        score = (abs(steps - target), steps)
        if best is None or score < best[0]:
            best = (score, repeats)
    assert best is not None
    return best[1]


def suggest_repeats(plan: TrainingPlan, target: int, epochs: int | None, own_reg: int = 0,
                    buckets: bool = False) -> list[str]:
    """Lines suggesting per-folder repeats that make `epochs` epochs take `target` steps, with the arithmetic
    (the seed tutorial's sum: 4800 steps / 10 epochs = 480 samples per epoch at batch 1; 480 / 32 images = 15
    repeats). `own_reg`: regularisation samples before balancing. ValueError when the config fixes the length in
    steps instead of epochs."""
    if epochs is None:
        raise ValueError("--suggest-repeats plans repeats for a number of epochs, but the config sets "
                         "train.max_steps (the length whatever the repeats): add train.epochs=N to the command")
    if not plan.folders:
        raise ValueError("--suggest-repeats: the dataset has no training folders")
    repeats = _best_repeats(plan, target, own_reg, epochs)
    samples, steps = _steps_for(plan, repeats, own_reg, epochs)
    batch = plan.batch_size * plan.accumulation
    lines = [f"repeats for {target} steps in {epochs} epochs (--suggest-repeats):",
             f"  per epoch : {target} steps / {epochs} epochs = {target / epochs:g} steps × {batch} images per step"
             f" = {target / epochs * batch:g} samples" + (" (half of them regularisation samples)" if own_reg else "")]
    for folder, new in zip(plan.folders, repeats):
        change = "unchanged" if new == folder.repeats else folder.how_to_change.format(new) or f"was {folder.repeats}"
        lines.append(f"  {folder.label}: {folder.images} images × {new} repeats = {folder.images * new} samples"
                     f"  ({change})")
    batches = math.ceil(samples / plan.batch_size)
    steps_text = f"ceil({samples} / batch size {plan.batch_size}) = {batches} batches"
    if plan.accumulation > 1:
        steps_text += f" / accumulation {plan.accumulation} → {math.ceil(batches / plan.accumulation)} steps"
    exact = "exactly" if steps == target else f"the nearest to {target} these folders allow"
    lines.append(f"  result : {epochs} epochs × {steps_text} per epoch = {steps} steps ({exact})")
    if buckets:
        lines.append("  note: with buckets a batch never mixes sizes, so partial batches may add a few steps; "
                     "run --check again after the change to see the exact count")
    return lines
