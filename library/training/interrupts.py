"""Ctrl-C and SIGTERM during training, handled so that a run is never lost: the first signal asks the loop to
stop after the step it is in (then the result and a resumable state are saved and the command that continues
is printed); a signal that arrives while stopping or saving only prints "saving, please wait". SIGTERM counts as
Ctrl-C, as cloud machines send it before they are taken away."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """While active (a context manager), SIGINT/SIGTERM set `requested` instead of raising KeyboardInterrupt."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet  # print nothing (the processes of a data-parallel run other than the main one)
        self.requested = False
        self.saving = False
        self.signal = signal.SIGINT  # the first signal received (its number sets the exit code)
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first, self.requested = not self.requested, True
        if first:
            self.signal = signal.Signals(signum)
        if self.quiet:
            return
        if first and not self.saving:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: stopping after this step, then saving the result and a state to resume from",
                  file=sys.stderr, flush=True)
        else:
            print("\nsaving, please wait (the run stops as soon as its files are written)", file=sys.stderr,
                  flush=True)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for number in _SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (130 for Ctrl-C)."""
        return 128 + int(self.signal)

    @contextmanager
    def saving_files(self) -> Iterator[None]:
        """Signals during a save are deferred: the save completes, then the run stops."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
