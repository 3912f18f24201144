"""What a run shows and records: the tqdm bar (loss, lr, it/s, ETA) and TensorBoard — scalars, the run's
resolved config as text, and (through the sampling hooks) preview images.

One TensorBoard run folder per training, `<log_dir>/<name>-<timestamp>`: a resumed run writes on in the folder
it started (so its curves continue), and the folder is only created with the first thing written, so a run that
fails before its first step leaves no empty run behind."""
from __future__ import annotations

import collections
import datetime
import os
import shlex
from pathlib import Path

from tqdm import tqdm

_REPO = Path(__file__).resolve().parents[2]


class MovingAverage:
    def __init__(self, window: int = 50):
        self.values: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, value: float) -> float:
        self.values.append(value)
        return self.value

    @property
    def value(self) -> float:
        return sum(self.values) / max(len(self.values), 1)


def run_folder(log_dir: str | Path, run_name: str, resumed_from: str | Path | None = None,
               continuing: bool = False) -> Path:
    """The TensorBoard folder of a run: the one a resumed state recorded (when it still exists); for a run that
    continues without one (an embedding resumed from its file), the newest folder of this run name; else new."""
    if resumed_from and Path(resumed_from).is_dir():
        return Path(resumed_from)
    if continuing:
        earlier = sorted(p for p in Path(log_dir).glob(f"{run_name}-*") if p.is_dir() and
                         p.name[len(run_name) + 1:].replace("-", "").isdigit())
        if earlier:
            return earlier[-1]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(log_dir) / f"{run_name}-{stamp}"


def _shown(path: Path) -> str:
    """A path as short as it stays correct from the current folder."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if relative.startswith("..") else relative


def tensorboard_command(folder: Path) -> str:
    """The line a trainer prints at start: the exact launcher command for this run's TensorBoard folder."""
    if os.name == "nt":
        return f'TensorBoard: {_shown(_REPO / "scripts" / "tensorboard.ps1")} "{_shown(folder)}"'
    shell = f"bash {shlex.quote(_shown(_REPO / 'scripts' / 'tensorboard.sh'))} {shlex.quote(_shown(folder))}"
    ps1 = f"{_shown(_REPO / 'scripts' / 'tensorboard.ps1')} '{_shown(folder)}'"
    return f"TensorBoard: {shell}   (PowerShell: {ps1})"


class RunLog:
    """Progress bar + TensorBoard writer for one run. `folder`: its TensorBoard folder (see run_folder); when it
    already holds the run's events (a resume), steps after `initial_step` written there before are dropped."""

    def __init__(self, folder: Path, total_steps: int, initial_step: int = 0, config_text: str = "",
                 quiet: bool = False):
        """quiet: no bar, lines or TensorBoard files (a data-parallel process other than the main one)."""
        self.dir = Path(folder)
        self.quiet = quiet
        self.initial_step = initial_step
        self.config_text = config_text
        self.resumed = self.dir.is_dir() and initial_step > 0
        self._writer = None
        self.average = MovingAverage()
        self.last_loss: float | None = None
        # refreshed at every step (a step takes far longer than drawing the bar)
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="training", unit="step", dynamic_ncols=True,
                        mininterval=0, miniters=1, disable=quiet)

    @property
    def writer(self):
        """The TensorBoard writer, created (with its folder and the config text) when first used."""
        if self._writer is None:
            # imported here: tensorboard pulls in a lot and only runs that train need it
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events of steps a resumed run trains again (resumed from an earlier state)
            self._writer = SummaryWriter(str(self.dir), purge_step=self.initial_step + 1 if self.resumed else None)
            if self.config_text:
                # indented: TensorBoard renders text as Markdown, and this keeps the TOML as written
                block = "\n".join("    " + line for line in self.config_text.splitlines())
                self._writer.add_text("config", block, self.initial_step)
        return self._writer

    def step(self, step: int, loss: float, lrs: dict[str, float], epoch: int,
             scalars: dict[str, float] | None = None) -> None:
        """Log one optimizer step; `scalars`: more TensorBoard values of it by tag (e.g. max_norm/keys_scaled)."""
        self.last_loss = loss
        average = self.average.add(loss)
        if self.quiet:
            return
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", average, step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step)
        for tag, value in (scalars or {}).items():
            self.writer.add_scalar(tag, value, step)
        shown = {"loss": f"{average:.4f}", "epoch": epoch + 1}
        shown.update({f"lr_{name}" if len(lrs) > 1 else "lr": f"{lr:.2e}" for name, lr in lrs.items()})
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        # tqdm starts each redraw with "\r", so a reader of lines (a log tee, a GUI wrapper) would get this step's
        # line only when the next step begins it; ending the line now hands it over as the step ends
        self.bar.fp.write("\r")
        self.bar.fp.flush()

    def epoch_end(self, epoch: int, mean_loss: float) -> None:
        if not self.quiet:
            self.writer.add_scalar("loss/epoch", mean_loss, epoch + 1)

    def write(self, message: str) -> None:
        if not self.quiet:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
