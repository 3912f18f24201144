"""What a run shows and records: the tqdm bar (loss, lr, it/s, ETA) and TensorBoard scalars."""
from __future__ import annotations

import collections
import datetime
from pathlib import Path

from tqdm import tqdm


class MovingAverage:
    def __init__(self, window: int = 50):
        self.values: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, value: float) -> float:
        self.values.append(value)
        return self.value

    @property
    def value(self) -> float:
        return sum(self.values) / max(len(self.values), 1)


class RunLog:
    """Progress bar + TensorBoard writer for one run."""

    def __init__(self, log_dir: str | Path, run_name: str, total_steps: int, initial_step: int = 0):
        # imported here: tensorboard pulls in a lot and only runs that train need it
        from torch.utils.tensorboard import SummaryWriter

        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = Path(log_dir) / f"{run_name}-{stamp}"
        self.writer = SummaryWriter(str(self.dir))
        self.average = MovingAverage()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="training", unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, lrs: dict[str, float], epoch: int) -> None:
        average = self.average.add(loss)
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", average, step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step)
        shown = {"loss": f"{average:.4f}", "epoch": epoch + 1}
        shown.update({f"lr_{name}" if len(lrs) > 1 else "lr": f"{lr:.2e}" for name, lr in lrs.items()})
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def epoch_end(self, epoch: int, mean_loss: float) -> None:
        self.writer.add_scalar("loss/epoch", mean_loss, epoch + 1)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()
        self.writer.close()
