"""Events of a training run that a recipe or the preview sampler may act on. Hooks observe and add outputs
(files, images, freezing a part at a step); they never replace the loop's parts: what the loop uses is decided
when the run is resolved and built."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from library.data.batches import Batch

if TYPE_CHECKING:
    from library.training.trainer import LoopParts, Trainer


class TrainerHooks:
    """The base class does nothing; override the events you need."""

    needs_vae = False  # True for hooks that decode with the VAE (previews): it then stays after latents are cached
    # True for hooks that only write outputs (files, images, logs): a data-parallel run calls them on its main
    # process only. Hooks that change what trains (freezing a part at a step) run on every process.
    writes_outputs = False

    def after_step(self, trainer: "Trainer", loop: "LoopParts", loss: float, lrs: dict[str, float],
                   batch: Batch) -> None:
        """After each optimizer step (trainer.progress already counts it). `lrs`: the rates that step used;
        `batch`: the last batch of its accumulation group."""

    def after_resume(self, trainer: "Trainer", loop: "LoopParts") -> None:
        """After a save.resume state has loaded (trainer.progress is the resumed step), before training goes on:
        whatever after_step changes at a given step must already hold when a run resumes past it."""

    def before_train(self, trainer: "Trainer", loop: "LoopParts") -> None:
        """After set-up and resume, right before the first step (trainer.log exists)."""

    def after_epoch(self, trainer: "Trainer", loop: "LoopParts", epoch: int) -> None:
        """After the last step of each complete epoch (also the run's last); `epoch`: epochs done, 1-based."""

    def after_save(self, trainer: "Trainer", loop: "LoopParts", artifact: Path) -> None:
        """After the artifact at `artifact` (an intermediate, interrupted or final save) is written."""

    def after_train(self, trainer: "Trainer", loop: "LoopParts", final: Path) -> None:
        """After the final artifact is saved."""


class CombinedHooks(TrainerHooks):
    """Several hooks as one: each event goes to each hook in the order given (a recipe's own hooks first,
    so e.g. sampling sees what they changed)."""

    def __init__(self, *hooks: TrainerHooks | None):
        self.hooks = [hook for hook in hooks if hook is not None]
        self.needs_vae = any(hook.needs_vae for hook in self.hooks)

    def after_step(self, trainer, loop, loss, lrs, batch) -> None:
        for hook in self.hooks:
            hook.after_step(trainer, loop, loss, lrs, batch)

    def after_resume(self, trainer, loop) -> None:
        for hook in self.hooks:
            hook.after_resume(trainer, loop)

    def before_train(self, trainer, loop) -> None:
        for hook in self.hooks:
            hook.before_train(trainer, loop)

    def after_epoch(self, trainer, loop, epoch) -> None:
        for hook in self.hooks:
            hook.after_epoch(trainer, loop, epoch)

    def after_save(self, trainer, loop, artifact) -> None:
        for hook in self.hooks:
            hook.after_save(trainer, loop, artifact)

    def after_train(self, trainer, loop, final) -> None:
        for hook in self.hooks:
            hook.after_train(trainer, loop, final)


def hooks_for_process(hooks: TrainerHooks | None, is_main: bool) -> TrainerHooks | None:
    """All of `hooks` on the main process; on the others, only those that change what trains."""
    if is_main or hooks is None:
        return hooks
    if isinstance(hooks, CombinedHooks):
        return CombinedHooks(*(hook for hook in hooks.hooks if not hook.writes_outputs))
    return None if hooks.writes_outputs else hooks
