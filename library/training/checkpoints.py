"""Output files of a run: names that carry epoch/step, keep-last-K, atomic writes, resumable training state."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from library.atomic import write_atomically
from library.faults import fault_point
from library.safe_load import UnreadableTensorFile, first_line, load_weights_only


@dataclass
class Progress:
    """Where a run is: optimizer steps done, current epoch (0-based) and the next batch within it."""

    global_step: int = 0
    epoch: int = 0
    next_batch: int = 0


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file so that a crash never leaves a half-written file at `path`."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda temporary: save_file(contiguous, str(temporary), metadata=metadata))


def epoch_file(output_dir: Path, name: str, epoch: int, suffix: str) -> Path:
    return output_dir / f"{name}-{epoch:06d}{suffix}"  # sd-scripts' naming, which users' scripts expect


def step_file(output_dir: Path, name: str, step: int, suffix: str) -> Path:
    return output_dir / f"{name}-step{step:08d}{suffix}"


def final_file(output_dir: Path, name: str, suffix: str) -> Path:
    return output_dir / f"{name}{suffix}"


def state_dir_for(artifact: Path) -> Path:
    return artifact.with_name(artifact.stem + "-state")


def existing_outputs(output_dir: Path, name: str) -> list[Path]:
    """Files, model folders (no suffix) and state folders an earlier run with this name left in output_dir."""
    if not output_dir.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(name)}(-\d{{6}}|-step\d{{8}})?(-ema)?(-state|\.[A-Za-z0-9]+)?$")
    return sorted(p for p in output_dir.iterdir() if pattern.match(p.name))


def remove_artifact(artifact: Path) -> None:
    """Delete an intermediate artifact (file or diffusers folder), its EMA twin (`<stem>-ema<suffix>`), its state
    folder and sidecars (`.optim`): the state first, so an interruption never leaves a state without the
    artifact it belongs to."""
    state = state_dir_for(artifact)
    if state.is_dir():
        shutil.rmtree(state)
    fault_point("prune-between", artifact)
    for sidecar in artifact.parent.glob(glob.escape(artifact.name) + ".*"):
        sidecar.unlink()
    for path in (artifact.with_name(artifact.stem + "-ema" + artifact.suffix), artifact):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def temporaries(output_dir: Path, name: str) -> list[Path]:
    """Hidden leftovers of this run name's interrupted writes in output_dir: `.<file>.<random>.tmp` files,
    `.<name>-state.tmp` and `.<folder>.tmp-<random>` folders, `.<folder>.old-<pid>` backups."""
    if not Path(output_dir).is_dir():
        return []
    # <name>[-<epoch>|-step<step>][-ema][-state][.suffixes] + .<8 random>.tmp | .tmp | .tmp-<random> | .old-<pid>
    pattern = re.compile(rf"^\.{re.escape(name)}(-\d{{6}}|-step\d{{8}})?(-ema)?(-state)?(\.[A-Za-z0-9]+)*"
                         r"\.([a-z0-9_]{8}\.tmp|tmp|tmp-[a-z0-9_]+|old-\d+)$")
    return sorted(p for p in Path(output_dir).iterdir() if pattern.match(p.name))


def remove_temporaries(output_dir: Path, name: str) -> list[Path]:
    """Remove (and return) what `temporaries` finds: nothing in it is a complete file."""
    found = temporaries(output_dir, name)
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return found


def prune_saved(saved: list[Path], keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` of the intermediates THIS run saved (oldest first in `saved`); delete the rest.
    Files of earlier runs are never touched: they may carry higher step numbers than this run's."""
    if keep_last <= 0 or len(saved) <= keep_last:
        return []
    old, saved[:] = saved[:-keep_last], saved[-keep_last:]
    for artifact in old:
        remove_artifact(artifact)
    return old


def save_state(folder: Path, progress: Progress, trainable: dict[str, torch.Tensor], optimizer, scheduler,
               scaler=None, extra: dict | None = None, ema: dict[str, torch.Tensor] | None = None) -> None:
    """Everything needed to continue exactly: trainable tensors, optimizer, LR schedule, step/epoch/batch, and
    the weights' moving average when the run keeps one (`ema.safetensors`; states without it still load).
    Data order and noise are derived from (seed, step), so no RNG state is needed. Written in a hidden folder
    beside it and moved into place, so a state folder is always complete (a kill leaves only a hidden one,
    which the next run removes)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fault_point("state-write", tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "progress.json").write_text(json.dumps({**asdict(progress), **(extra or {})}, indent=2))
    fault_point("state-before-rename", folder)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


@dataclass
class LoadedState:
    progress: Progress
    extra: dict
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    ema: dict[str, torch.Tensor] | None = None  # the weights' moving average, when the run kept one


def _safe_load(path: Path):
    try:
        return load_weights_only(path)
    except UnreadableTensorFile as err:
        raise ValueError(f"{err}: resume from another state Kiln wrote") from None


def load_state(folder: Path) -> LoadedState:
    """Read a state folder written by save_state (tensors via safetensors, the rest with weights_only=True).
    ValueError with one line naming the file for a missing, damaged or foreign part."""
    missing = [n for n in ("progress.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt")
               if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a complete training state (missing {', '.join(missing)})")
    try:
        info = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        progress = Progress(info.pop("global_step"), info.pop("epoch"), info.pop("next_batch"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{folder / 'progress.json'} is damaged ({exc}): resume from an earlier state") from None
    trainable = _safe_tensors(folder / "trainable.safetensors")
    scaler_path, ema_path = folder / "scaler.pt", folder / "ema.safetensors"
    return LoadedState(progress=progress, extra=info, trainable=trainable,
                       optimizer=_safe_load(folder / "optimizer.pt"), scheduler=_safe_load(folder / "scheduler.pt"),
                       scaler=_safe_load(scaler_path) if scaler_path.is_file() else None,
                       ema=_safe_tensors(ema_path) if ema_path.is_file() else None)


def _safe_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a cut-short file
        raise ValueError(f"{path} is damaged ({first_line(exc)}): resume from an earlier state") from None
