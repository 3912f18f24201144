"""Fault injection for the reliability tests (tests/faults/): named points in the save and training paths where a
test can make the process die (SIGKILL, as a power cut or an out-of-memory kill would) or a write fail with a
full disk (ENOSPC), at the N-th time the point is reached.

    KILN_FAULTS="state-before-rename:2=kill,artifact-write:3=enospc"

Unset — always, outside those tests — a fault point costs one environment lookup.
"""
from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_reached: Counter = Counter()


def _plan() -> dict[tuple[str, int], str]:
    plan = {}
    for entry in filter(None, (part.strip() for part in os.environ.get("KILN_FAULTS", "").split(","))):
        where, _, action = entry.partition("=")
        point, _, count = where.partition(":")
        plan[(point, int(count or 1))] = action or "kill"
    return plan


def fault_point(name: str, path: object = None) -> None:
    """Die or fail here when KILN_FAULTS asks for this point at this occurrence."""
    if "KILN_FAULTS" not in os.environ:
        return
    _reached[name] += 1
    action = _plan().get((name, _reached[name]))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else None)
