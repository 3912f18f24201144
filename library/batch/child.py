"""One queued run as a child process: its output goes to its log file and to the console, and Ctrl-C stops it
the way a single run stops (it saves a resumable state) instead of killing it.

On POSIX the child runs in its own process group, so the terminal's Ctrl-C reaches only the queue, which passes
exactly one SIGINT on (a second one while the run writes its state would cut that short); SIGTERM is treated
the same, and so is SIGHUP (the terminal closed). On Windows every process on the console receives Ctrl-C itself,
so nothing is forwarded."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StopRequest:
    """Set once the user asked the queue to stop (Ctrl-C or SIGTERM): the current run saves, the rest skip."""

    requested: bool = False
    forwarded: bool = False


class _Handler:
    def __init__(self, stop: StopRequest):
        self.stop = stop
        self.process: subprocess.Popen | None = None

    def attach(self, process: subprocess.Popen | None) -> None:
        """The run signals go to now (None between runs); a stop asked for just before it started reaches it."""
        self.process = process
        if process is not None and self.stop.requested:
            self._forward(process)

    def _forward(self, process: subprocess.Popen) -> None:
        if os.name != "nt" and not self.stop.forwarded and process.poll() is None:
            self.stop.forwarded = True
            process.send_signal(signal.SIGINT)
            print("\nqueue: stopping the current run (it saves a resumable state); the rest are skipped",
                  file=sys.stderr, flush=True)

    def __call__(self, signum, frame) -> None:
        first = not self.stop.requested
        self.stop.requested = True
        process = self.process
        if process is None or process.poll() is not None:
            if first:
                print("\nqueue: stopping; the remaining runs are skipped", file=sys.stderr, flush=True)
        elif not self.stop.forwarded and os.name != "nt":
            self._forward(process)
        elif not first:
            print("\nqueue: waiting for the run to finish saving its state", file=sys.stderr, flush=True)


class StopSignals:
    """Installs the queue's SIGINT/SIGTERM handler for the duration of a `with` block."""

    def __init__(self, stop: StopRequest):
        self.handler = _Handler(stop)
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # a closed terminal too: the run saves its state
            number = getattr(signal, name, None)
            if number is not None:
                self.previous[number] = signal.signal(number, self.handler)
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self.previous.items():
            signal.signal(number, previous)


def run_child(command: list[str], log_file: Path, signals: StopSignals, echo: bool = True) -> int:
    """Run `command`, copying its output (stdout and stderr together) to `log_file` and, with `echo`, to this
    console; returns its exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONUTF8": "1"}
    options = {"process_group": 0} if os.name != "nt" else {}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log:
        log.write(("$ " + subprocess.list2cmdline(command) + "\n").encode("utf-8"))
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   **options)
        signals.handler.attach(process)
        try:
            assert process.stdout is not None
            while chunk := process.stdout.read1(65536):
                log.write(chunk)
                log.flush()
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            return process.wait()
        finally:
            signals.handler.attach(None)
            if process.poll() is None:  # the queue itself failed: do not leave the run behind
                process.kill()
                process.wait()
