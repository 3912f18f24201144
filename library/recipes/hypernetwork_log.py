"""A1111's log folder for a hypernetwork run (the shared part: a1111_folder.py): hypernetworks/<name>-<step>.pt
with their `.optim`, images/<name>-<step>.png (sampled with the hypernetwork applied) and
hypernetwork_loss.csv; and the `.optim` beside every saved file."""
from __future__ import annotations

from pathlib import Path

from library.networks.hypernetwork import save_hypernetwork, save_optimizer_state
from library.networks.hypernetwork_trainable import HypernetworkTrainable
from library.recipes.a1111_folder import A1111LogFolder
from library.training.plan import TrainingPlan
from library.training.trainer import LoopParts, Trainer

CSV_NAME = "hypernetwork_loss.csv"


class HypernetworkLog(A1111LogFolder):
    csv_name = CSV_NAME
    copy_every_key = "save_hypernetwork_every"

    def __init__(self, config, trainable: HypernetworkTrainable, plan: TrainingPlan):
        hn = config.hypernetwork
        super().__init__(config, hn.name, hn, config.hypernetwork_log, plan, trainable)

    def save_copy(self, step: int, loop: LoopParts) -> Path:
        """A copy as A1111 writes it (its `name` stays the hypernetwork's), with the optimizer state to resume."""
        path = self.folder / "hypernetworks" / f"{self.name}-{step}.pt"
        network = self.trainable.network
        network.step = step
        save_hypernetwork(network, path, self.trainable.save_dtype)
        if self.config.hypernetwork.save_optimizer_state:
            save_optimizer_state(path, loop.optimizer.state_dict(), self.optimizer_name)
        return path

    def after_save(self, trainer: Trainer, loop: LoopParts, artifact: Path) -> None:
        """The `.optim` beside every saved file (intermediate, interrupted by Ctrl-C, final), so continuing from
        any of them with hypernetwork.resume is exact."""
        if self.config.hypernetwork.save_optimizer_state:
            save_optimizer_state(artifact, loop.optimizer.state_dict(), self.optimizer_name)

    def settings(self, trainer: Trainer) -> dict:
        spec = self.trainable.network.spec
        return {**super().settings(trainer), "hypernetwork_name": self.name,
                "layer_structure": list(spec.layer_structure), "activation_func": spec.activation_func,
                "weight_init": spec.weight_initialization, "add_layer_norm": spec.is_layer_norm,
                "use_dropout": spec.use_dropout,
                "save_hypernetwork_every": self.config.hypernetwork_log.save_hypernetwork_every}
