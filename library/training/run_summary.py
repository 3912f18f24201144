"""A run's machine-readable summary, `<output_dir>/<name>.run.json`, for scripts and the run queue: its status
("running", "finished", "interrupted", "failed"), steps, final loss, output file, TensorBoard folder and, when
interrupted, the state folder that continues it. Rewritten atomically at start and end, so it always parses."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from library.atomic import write_text_atomically

SUFFIX = ".run.json"


def summary_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / f"{name}{SUFFIX}"


def write_run_summary(path: Path, status: str, **fields) -> None:
    """Write the summary; `fields`: step, total_steps, final_loss, last_loss, output, resume_state, tensorboard,
    error, processes (data-parallel runs); None values are left out."""
    data = {"status": status, **{k: v for k, v in fields.items() if v is not None},
            "updated": datetime.datetime.now().isoformat(timespec="seconds")}
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def read_run_summary(path: Path) -> dict | None:
    """The summary at `path`, or None when there is none (or it is not one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("status"), str) else None
