"""Fault injection for the reliability tests (tests/faults/): named points in the save and training paths where a
test makes something go wrong at the N-th time the point is reached:

    KILN_FAULTS="state-before-rename:2=kill,artifact-write:3=enospc,step:4=sigint"

kill: SIGKILL (a power cut, an out-of-memory kill); sigint / sigterm: the signal to this process (Ctrl-C, a
cloud machine's preemption); enospc / erofs: the write fails (disk full, read-only disk); fill: a file fills the
disk of the folder KILN_FAULTS_FILL names, so later writes there really fail; nan: the loss at that step is NaN.
KILN_FAULTS_TRACE=<file> appends each point reached, to list where a run can be hit.

Unset — always, outside those tests — a fault point costs one environment lookup.
"""
from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_reached: Counter = Counter()
_ERRORS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}
_SIGNALS = {"kill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}


def _plan() -> dict[tuple[str, int], str]:
    plan = {}
    for entry in filter(None, (part.strip() for part in os.environ.get("KILN_FAULTS", "").split(","))):
        where, _, action = entry.partition("=")
        point, _, count = where.partition(":")
        plan[(point, int(count or 1))] = action or "kill"
    return plan


def reset() -> None:
    """Forget the points reached (a test process that runs several trainings)."""
    _reached.clear()


def _fill(folder: str) -> None:
    block = b"\0" * (1 << 16)
    try:
        with open(os.path.join(folder, "kiln-fault-filler"), "ab") as handle:
            while True:
                handle.write(block)
                handle.flush()
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise


def fault_point(name: str, path: object = None) -> str | None:
    """Act here when KILN_FAULTS asks for this point at this occurrence; returns an action the caller applies
    itself ("nan"), else None."""
    if "KILN_FAULTS" not in os.environ:
        return None
    _reached[name] += 1
    if trace := os.environ.get("KILN_FAULTS_TRACE"):
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(f"{name}:{_reached[name]}\n")
    action = _plan().get((name, _reached[name]))
    if action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[action])
    elif action == "fill":
        _fill(os.environ["KILN_FAULTS_FILL"])
    elif action in _ERRORS:
        code = _ERRORS[action]
        raise OSError(code, os.strerror(code), str(path) if path is not None else None)
    return action
