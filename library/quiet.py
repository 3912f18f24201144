"""Keep the console readable: third-party import banners and warnings that say nothing to a Kiln user.

Scripts call `quiet_libraries()` first. What Kiln itself has to say (fallbacks, assumptions) is printed by Kiln.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Swallow stdout/stderr (Python- and fd-level), logging and warnings, e.g. bitsandbytes' import banner."""
    sink = io.StringIO()
    saved_fds: list[tuple[int, int]] = []
    previous_disable = logging.root.manager.disable
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):
                continue  # no real fd (e.g. captured or GUI); Python-level redirect still applies
            devnull = os.open(os.devnull, os.O_WRONLY)
            saved_fds.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
            os.close(devnull)
        logging.disable(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous_disable)
        for fd, saved in reversed(saved_fds):
            os.dup2(saved, fd)
            os.close(saved)


def quiet_libraries() -> None:
    """Lower diffusers/transformers logging to errors and import bitsandbytes silently (peft imports it, and
    it prints a kernel banner on machines without CUDA)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if importlib.util.find_spec("bitsandbytes") is not None:
        with silenced():
            try:
                import bitsandbytes  # noqa: F401
            except Exception:  # a broken install is reported by the optimizer that needs it
                pass
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
