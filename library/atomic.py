"""Atomic file writes: write beside the target, then rename, so a crash never leaves a half-written file.

The one place every module writes user-visible files through (models, LoRAs, embeddings, captions, images).
"""
from __future__ import annotations

import os
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
        write(temporary)
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
