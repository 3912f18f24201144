"""The run queue behind scripts/train_queue.sh and scripts/train_queue.ps1 (both only find the venv's Python
and call this, so the two stay mirrors of one tested implementation).

Runs each config with the trainer its file names, one after another, each with its own log file; a failed run
does not stop the queue; the summary table is printed and written as CSV; the exit code is non-zero when a run
failed. Ctrl-C stops the current run as a single run stops (it saves a resumable state) and skips the rest;
`--resume` skips runs that finished and continues unfinished ones from their last state."""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from library.batch.child import StopRequest, StopSignals, run_child
from library.batch.entries import QueueEntry, plan_entries
from library.batch.report import SUMMARY_NAME, RunResult, counts_line, table_lines, write_csv
from library.training.logs import tensorboard_command
from library.training.run_summary import read_run_summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_queue", description="Run a queue of Kiln trainings, one config file after another.")
    parser.add_argument("items", nargs="+", metavar="CONFIG|section.key=value",
                        help="config files or globs (quote a glob to let the queue expand it, e.g. "
                             "'night/*.toml'), and overrides applied to every run, e.g. train.max_steps=500")
    parser.add_argument("--resume", action="store_true",
                        help="skip runs that finished; continue unfinished ones from their last saved state")
    parser.add_argument("--queue-dir", help="folder for the run logs and summary.csv "
                                            "(default: logs/queue-<date>-<time>)")
    parser.add_argument("--quiet", action="store_true", help="write run output to the log files only")
    args = parser.parse_intermixed_args(argv)
    args.overrides = [i for i in args.items if "=" in i and not Path(i).is_file()]
    args.configs = [i for i in args.items if i not in args.overrides]
    if not args.configs:
        parser.error("name at least one config file")
    return args


def _finish(entry: QueueEntry, code: int, started: float, log_file: Path) -> RunResult:
    status = "ok" if code == 0 else "interrupted" if code in (130, 143) else "failed"  # Ctrl-C, SIGTERM
    result = RunResult(entry, status, code, time.monotonic() - started, log_file)
    summary = read_run_summary(entry.summary_file) if entry.summary_file else None
    # only this run's summary counts: an earlier run's file is older than this run's start
    if summary and entry.summary_file.stat().st_mtime >= time.time() - result.seconds - 1:
        result.output = summary.get("output", "")
        result.final_loss = summary.get("final_loss")
        result.tensorboard = str(Path(summary.get("tensorboard", "")).resolve()) if summary.get("tensorboard") else ""
    return result


def _earlier(entry: QueueEntry) -> RunResult:
    summary = (read_run_summary(entry.summary_file) if entry.summary_file else None) or {}
    return RunResult(entry, "done earlier", output=summary.get("output", ""),
                     final_loss=summary.get("final_loss"), tensorboard=summary.get("tensorboard", ""))


def run_entry(entry: QueueEntry, queue_dir: Path, signals: StopSignals, echo: bool) -> RunResult:
    log_file = queue_dir / f"{entry.index:02d}-{entry.config.stem}.log"
    print(f"\n=== [{entry.index}] {entry.config} ({entry.trainer or 'unknown trainer'})"
          + (f": {entry.note}" if entry.note else "") + f"\n    log: {log_file}", flush=True)
    started = time.monotonic()
    if entry.problem:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f"error: {entry.problem}\n", encoding="utf-8")
        print(f"error: {entry.problem}", file=sys.stderr, flush=True)
        return RunResult(entry, "failed", 2, time.monotonic() - started, log_file)
    code = run_child(entry.command(sys.executable), log_file, signals, echo)
    return _finish(entry, code, started, log_file)


def run_queue(args: argparse.Namespace) -> int:
    try:
        entries = plan_entries(args.configs, args.overrides, args.resume)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    queue_dir = Path(args.queue_dir or Path("logs") / f"queue-{stamp}")
    print(f"queue: {len(entries)} run(s); logs and summary in {queue_dir}\n"
          f"{tensorboard_command(queue_dir)}", flush=True)
    stop = StopRequest()
    results: list[RunResult] = []
    write_csv(queue_dir / SUMMARY_NAME, [RunResult(entry, "pending") for entry in entries])
    with StopSignals(stop) as signals:
        for entry in entries:
            if stop.requested:
                results.append(RunResult(entry, "skipped"))
            elif entry.done_earlier:
                print(f"\n=== [{entry.index}] {entry.config}: {entry.note} (skipped)", flush=True)
                results.append(_earlier(entry))
            else:
                results.append(run_entry(entry, queue_dir, signals, not args.quiet))
            pending = [RunResult(entry, "pending") for entry in entries[len(results):]]
            write_csv(queue_dir / SUMMARY_NAME, results + pending)  # kept current, so a crashed queue has one
    print("\nqueue summary:")
    for line in table_lines(results):
        print(f"  {line}")
    print(f"{counts_line(results)}\nsummary: {queue_dir / SUMMARY_NAME}")
    if stop.requested:
        print("stopped: run the same command with --resume to continue", flush=True)
        return 130
    return 1 if any(r.status in ("failed", "interrupted") for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    return run_queue(parse_args(argv))
