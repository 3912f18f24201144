"""Where a run's files go and what happens when they cannot be written: intermediates on the configured cadence
(pruned to save.keep_last, states before their artifacts), the interrupted save with the command that continues
it, the final save, and a rescue folder when the output folder fails — a run is never lost silently."""
from __future__ import annotations

import datetime
import shlex
import tempfile
from pathlib import Path
from typing import Callable

from library.errors import UserError
from library.training.checkpoints import (Progress, epoch_file, final_file, prune_saved, remove_temporaries,
                                          state_dir_for, step_file)
from library.training.interrupts import StopRequests

WriteFiles = Callable[[Path, bool], None]  # (artifact, with_state): write the artifact and, if asked, its state


class SaveFailed(UserError):
    """The output folder could not take the result; the message names the rescue folder that holds it."""


def rescue_folders(name: str) -> list[Path]:
    """Where a result goes when its output folder fails: the home folder first (often another disk than the
    output), then the system's temporary folder."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return [Path.home() / ".kiln-rescue" / f"{name}-{stamp}",
            Path(tempfile.gettempdir()) / "kiln-rescue" / f"{name}-{stamp}"]


class RunSaver:
    """Writes the run's files through `write_files`; reports a failed write in one line and lets training go on
    (the next save tries again); the final or interrupted save that fails goes to a rescue folder instead."""

    def __init__(self, save, suffix: str, stops: StopRequests, write_files: WriteFiles,
                 say: Callable[[str], None], command: list[str] | None = None, writes: bool = True):
        self.save = save  # the config's [save] section
        self.writes = writes  # False on the processes of a data-parallel run other than the main one
        self.output_dir = Path(save.output_dir)
        self.suffix = suffix
        self.stops = stops
        self.write_files = write_files
        self.say = say
        self.command = command or []
        self.saved: dict[str, list[Path]] = {"epoch": [], "step": []}  # this run's intermediates, for keep_last
        self.last_good: Path | None = None
        self.failed: OSError | None = None

    def clean_leftovers(self) -> None:
        """Remove what interrupted writes of this run name left hidden in the output folder (and say so)."""
        if not self.writes:
            return
        removed = remove_temporaries(self.output_dir, self.save.name)
        if removed:
            listed = ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else "")
            self.say(f"removed {len(removed)} incomplete file(s) an interrupted run left in {self.output_dir}: {listed}")

    def write(self, artifact: Path, with_state: bool, kind: str | None = None) -> bool:
        """Write an artifact (and its state); False, after one line naming the path and the error, if it failed."""
        try:
            with self.stops.saving_files():
                self.write_files(artifact, with_state)
        except OSError as err:
            self.failed = err
            self.say(f"could not save {err.filename or artifact}: {err.strerror or err} (errno {err.errno}); "
                     "training goes on in memory and the next save tries again")
            return False
        self.failed, self.last_good = None, artifact
        if kind is not None:
            self.saved[kind].append(artifact)
            prune_saved(self.saved[kind], self.save.keep_last)
        return True

    def due(self, progress: Progress, total_steps: int, epoch_done: bool) -> None:
        """Save an intermediate when the cadence asks for one (not at the last step: the final save follows)."""
        save = self.save
        if progress.global_step >= total_steps or not self.writes:
            return
        if epoch_done and save.every_n_epochs and progress.epoch % save.every_n_epochs == 0:
            path, kind = epoch_file(self.output_dir, save.name, progress.epoch, self.suffix), "epoch"
        elif not epoch_done and save.every_n_steps and progress.global_step % save.every_n_steps == 0:
            path, kind = step_file(self.output_dir, save.name, progress.global_step, self.suffix), "step"
        else:
            return
        if self.write(path, save.save_state, kind):
            self.say(f"saved {path}")

    def final(self) -> Path:
        """The final artifact (and a state when save.save_state). When the output folder fails, the result and a
        state go to a rescue folder and SaveFailed says where and how to continue: the run is not lost, but
        its file is not where it was asked for either (a queue must not go on as if it were)."""
        path = self.final_path()
        if self.write(path, self.save.save_state):
            return path
        reason = self._reason()
        rescued = self.rescue(path)
        raise SaveFailed(f"could not write {path} ({reason}); the result is in {rescued} and a state to resume "
                         f"from in {state_dir_for(rescued)}. Free some space, then continue with: "
                         f"{self.resume_command(state_dir_for(rescued))}")

    def final_path(self) -> Path:
        return final_file(self.output_dir, self.save.name, self.suffix)

    def interrupted(self, step: int) -> tuple[Path, Path]:
        """The artifact and state of an interrupted run; (artifact, state folder), in a rescue folder when the
        output folder fails."""
        path = step_file(self.output_dir, self.save.name, step, self.suffix)
        if not self.write(path, with_state=True):
            reason = self._reason()
            path = self.rescue(path)
            self.say(f"could not write to {self.output_dir} ({reason}): saved to {path.parent} instead")
        return path, state_dir_for(path)

    def _reason(self) -> str:
        return f"{self.failed.strerror or self.failed} (errno {self.failed.errno})" if self.failed else "failed"

    def rescue(self, wanted: Path) -> Path:
        """Write the result and its state in a rescue folder; SaveFailed (one line) when none can take them."""
        reason = self._reason()
        for folder in rescue_folders(self.save.name):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / wanted.name
                with self.stops.saving_files():
                    self.write_files(path, True)
            except OSError:
                continue
            return path
        tried = ", ".join(str(folder.parent) for folder in rescue_folders(self.save.name))
        last = self.last_good or "none (nothing was saved)"
        raise SaveFailed(f"could not write {wanted} ({reason}), nor a rescue copy in {tried}: free some disk space; "
                         f"the last good save is {last}")

    def resume_command(self, state: Path) -> str:
        """The command that continues from `state`: the original one, with save.resume set."""
        args = [a for a in self.command if not a.startswith("save.resume=")]
        return shlex.join([*args, f"save.resume={state}"]) if args else f"save.resume={state}"
