"""Will the planned saves fit? The files a run writes — the final artifact, the intermediates save.keep_last
keeps, resumable states, the disk latent cache — estimated from parameter counts read without loading the model
(library/models/sizes.py), against the free space of each disk, in `--check` and before the model loads."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

# Bytes of optimizer state per trained parameter (fp32 moments; 8-bit ones are one byte each).
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "AdamW8bit": 2, "Lion": 4, "DAdaptAdam": 12, "Adafactor": 4, "Prodigy": 16,
                         "SGDNesterov": 4}
SAVE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class SaveSizes:
    """The estimated size of one saved artifact and of one resumable state (trained weights + optimizer)."""

    artifact: int
    state: int


def state_bytes(trained_params: int, optimizer: str) -> int:
    """A state folder: the trained tensors in fp32 plus the optimizer's moments."""
    return trained_params * (4 + OPTIMIZER_STATE_BYTES.get(optimizer, 8))


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@dataclass(frozen=True)
class PlannedSaves:
    """How many artifacts and states a run keeps at its peak in the output folder."""

    artifacts: int
    states: int
    described: str  # the count, in words, for the summary

    def bytes(self, sizes: SaveSizes) -> int:
        return self.artifacts * sizes.artifact + self.states * sizes.state


def planned_saves(total_steps: int, epochs: int, save) -> PlannedSaves:
    """Count the saves of `save` ([save] section) over the plan. Intermediates are pruned to keep_last after the
    next one is written, so one more than kept exists for a moment; a Ctrl-C always writes a state."""
    intermediates = 0
    if save.every_n_epochs:
        intermediates += max(epochs - 1, 0) // save.every_n_epochs
    if save.every_n_steps:
        intermediates += max(total_steps - 1, 0) // save.every_n_steps
    kept = min(intermediates, save.keep_last + 1) if save.keep_last else intermediates
    artifacts = kept + 1
    states = artifacts if save.save_state else 1
    words = f"the final file + {kept} intermediate(s)" if kept else "the final file"
    words += f" and {states} state(s)" if save.save_state else " and the state a stop (Ctrl-C) writes"
    return PlannedSaves(artifacts, states, words)


def free_bytes(folder: Path) -> int | None:
    """Free space of the disk that holds (or will hold) `folder`, or None when it cannot be told."""
    existing = Path(folder).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def space_line_and_problem(folder: Path, key: str, needed: int, what: str,
                           advice: str) -> tuple[str, str | None]:
    """A summary line (needed vs free) and, when the disk is too small, the problem naming `key`."""
    free = free_bytes(folder)
    line = f"{key}: about {human(needed)} for {what}" + (f"; {human(free)} free" if free is not None else "")
    if free is None or needed <= free:
        return line, None
    return line, (f"{key}: the run needs about {human(needed)} in {folder} for {what}, but its disk has only "
                  f"{human(free)} free: {advice}")
