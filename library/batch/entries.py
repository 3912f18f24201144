"""What the queue runs for each config file: its trainer (from the file), the script and overrides, where
the run's summary will be, and — with --resume — whether it is done, continues from a state, or starts."""
from __future__ import annotations

import glob
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from library.config.loading import ConfigError, read_raw_config
from library.config.trainers import TRAINER_SCRIPTS, infer_trainer, wrong_trainer_message
from library.training.run_summary import read_run_summary, summary_path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class QueueEntry:
    index: int  # 1-based position in the queue
    config: Path
    trainer: str = ""
    overrides: list[str] = field(default_factory=list)  # the queue's overrides, plus save.resume when resuming
    summary_file: Path | None = None  # <output_dir>/<name>.run.json, when the config could be read
    log_dir: Path | None = None  # its logging.log_dir (absolute), where its TensorBoard folder will be
    problem: str = ""  # why it cannot start (unreadable file, unknown trainer): it fails without launching
    done_earlier: bool = False  # --resume: an earlier queue finished it
    note: str = ""  # e.g. "continues from <state>"

    @property
    def script(self) -> Path:
        return REPO / TRAINER_SCRIPTS[self.trainer]

    def command(self, python: str) -> list[str]:
        # -X utf8: captions, prompts and paths are UTF-8 whatever the console's code page
        return [python, "-X", "utf8", str(self.script), str(self.config), *self.overrides]


def expand_configs(patterns: list[str]) -> list[Path]:
    """Config files from paths and globs (`configs/night/*.toml`, `**` too), in the order given, each once;
    ValueError naming a pattern that matches nothing."""
    found: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise ValueError(f"no config file matches {pattern!r}")
        else:
            matches = [Path(pattern)]
        found.extend(m for m in matches if m.resolve() not in {f.resolve() for f in found})
    return found


def _locate_outputs(entry: QueueEntry) -> None:
    """The run's summary file and log folder, from the validated config (trainer-specific defaults included);
    left unset when the config has problems (the run then reports them itself)."""
    from library.recipes.run import read_config

    recipe = importlib.import_module(f"library.recipes.{entry.trainer}").RECIPE
    try:
        loaded = read_config(entry.config, entry.overrides, recipe)
    except (ConfigError, ValueError):
        return
    entry.summary_file = summary_path(loaded.save.output_dir, loaded.save.name)
    entry.log_dir = Path(loaded.logging.log_dir).resolve()


def _newest_state(output_dir: Path, name: str) -> Path | None:
    """The state folder of this run name with the most steps done (an interrupted or intermediate save)."""
    pattern = re.compile(rf"^{re.escape(name)}(-\d{{6}}|-step\d{{8}})?-state$")
    best: tuple[int, Path] | None = None
    for folder in output_dir.glob(f"{glob.escape(name)}*-state") if output_dir.is_dir() else []:
        try:
            step = json.loads((folder / "progress.json").read_text())["global_step"]
        except (OSError, ValueError, KeyError):
            continue
        if pattern.match(folder.name) and (best is None or step > best[0]):
            best = (step, folder)
    return best[1] if best else None


def _resume(entry: QueueEntry) -> None:
    """--resume: skip a finished run; continue an unfinished one from its last state."""
    if entry.summary_file is None or any(o.split("=", 1)[0].strip() == "save.resume" for o in entry.overrides):
        return
    summary = read_run_summary(entry.summary_file) or {}
    if summary.get("status") == "finished" and Path(summary.get("output", "")).exists():
        entry.done_earlier, entry.note = True, f"finished earlier: {summary['output']}"
        return
    state = summary.get("resume_state") if summary.get("status") == "interrupted" else None
    if not (state and Path(state).is_dir()):
        name = entry.summary_file.name.removesuffix(".run.json")
        state = _newest_state(entry.summary_file.parent, name)
    if state:
        entry.overrides.append(f"save.resume={Path(state).as_posix()}")
        entry.note = f"continues from {state}"


def plan_entries(patterns: list[str], overrides: list[str], resume: bool) -> list[QueueEntry]:
    """One entry per config file, its trainer read from the file (`trainer = "..."` or its sections)."""
    entries = []
    for index, config in enumerate(expand_configs(patterns), 1):
        entry = QueueEntry(index, config, overrides=list(overrides))
        entries.append(entry)
        try:
            entry.trainer = infer_trainer(read_raw_config(config, overrides).data)
        except ConfigError as err:
            entry.problem = str(err)
            continue
        if entry.trainer not in TRAINER_SCRIPTS:
            entry.problem = f"{config}: {wrong_trainer_message(entry.trainer, 'lora')}"
            continue
        _locate_outputs(entry)
        if resume:
            _resume(entry)
    return entries
