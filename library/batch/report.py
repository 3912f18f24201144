"""The queue's summary: one row per config (config, trainer, status, time, output file, final loss), printed
as a table and written as `summary.csv` in the queue folder (the TensorBoard launcher reads its
`tensorboard` column to show every run of a queue)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from library.atomic import write_text_atomically
from library.batch.entries import QueueEntry

SUMMARY_NAME = "summary.csv"
COLUMNS = ("index", "config", "trainer", "status", "exit_code", "seconds", "output", "final_loss", "log",
           "tensorboard", "log_dir")


@dataclass
class RunResult:
    entry: QueueEntry
    status: str  # "ok", "failed", "interrupted", "skipped" (after a stop), "done earlier" (--resume), "pending"
    exit_code: int | None = None
    seconds: float = 0.0
    log_file: Path | None = None
    output: str = ""
    final_loss: float | None = None  # the mean loss of the run's last (up to 50) steps
    tensorboard: str = ""

    def row(self) -> dict:
        return {"index": self.entry.index, "config": str(self.entry.config), "trainer": self.entry.trainer,
                "status": self.status, "exit_code": "" if self.exit_code is None else self.exit_code,
                "seconds": f"{self.seconds:.1f}", "output": self.output,
                "final_loss": "" if self.final_loss is None else f"{self.final_loss:.6g}",
                "log": str(self.log_file or ""), "tensorboard": self.tensorboard,
                "log_dir": str(self.entry.log_dir or "")}


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def table_lines(results: list[RunResult]) -> list[str]:
    """The summary table, aligned for a console."""
    header = ("#", "config", "trainer", "status", "time", "output", "final loss")
    rows = [header]
    for r in results:
        status = f"failed (exit {r.exit_code})" if r.status == "failed" and r.exit_code is not None else r.status
        loss = "-" if r.final_loss is None else f"{r.final_loss:.4f}"
        time = duration(r.seconds) if r.status not in ("skipped", "done earlier") else "-"
        rows.append((str(r.entry.index), str(r.entry.config), r.entry.trainer or "?", status, time,
                     r.output or "-", loss))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def counts_line(results: list[RunResult]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return f"{len(results)} run(s): " + ", ".join(f"{n} {status}" for status, n in counts.items())


def write_csv(path: Path, results: list[RunResult]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerow(result.row())
    write_text_atomically(path, buffer.getvalue())


def read_log_dirs(path: Path) -> list[Path]:
    """The log folders (logging.log_dir) of a queue's runs, from its summary.csv, each once: TensorBoard on
    them shows every run of the queue, including those that have not started yet."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    found: list[Path] = []
    for row in rows:
        if row.get("log_dir") and Path(row["log_dir"]) not in found:
            found.append(Path(row["log_dir"]))
    return found
