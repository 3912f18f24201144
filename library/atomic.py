"""Atomic file writes: write beside the target, then rename, so a crash never leaves a half-written file.

The one place every module writes user-visible files through (models, LoRAs, embeddings, captions, images).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from library.faults import fault_point


def _default_mode() -> int:
    # mkstemp and safetensors create 0600 files; give outputs the usual umask-based permissions instead,
    # so a WebUI running as another user can read them
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def disk_error(exc: Exception, path: Path) -> OSError | None:
    """The OSError behind a library's write error (safetensors: "... (os error 28)"; torch.save: "file write
    failed"), so a full disk reads the same whatever wrote the file; None for other errors."""
    text = str(exc)
    if found := re.search(r"os error (\d+)", text):
        code = int(found.group(1))
    elif "write failed" in text or "No space left" in text:
        code = errno.ENOSPC if shutil.disk_usage(path.parent).free < (1 << 20) else errno.EIO
    else:
        return None
    return OSError(code, os.strerror(code), str(path))


def write_atomically(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call write(temporary_path), then move the file onto `path`. On any error the temporary file is removed
    and `path` is untouched. `mode`: permissions (default: an existing file's, else umask-based)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = (path.stat().st_mode & 0o777) if path.exists() else _default_mode()
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temporary = Path(name)
    try:
        fault_point("artifact-write", path)
        try:
            write(temporary)
        except OSError:
            raise
        except Exception as exc:  # a library's own error for a failed write: an OSError like any other
            as_os_error = disk_error(exc, path)
            if as_os_error is None:
                raise
            raise as_os_error from None
        os.chmod(temporary, mode)
        fault_point("artifact-before-rename", path)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """UTF-8 text with '\\n' line ends on every platform."""
    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)

    write_atomically(path, write)
