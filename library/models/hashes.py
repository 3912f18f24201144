"""The model hashes other tools show: A1111's short hash (the first 10 hex digits of the file's SHA-256, what
an embedding's `sd_checkpoint` and A1111's model list carry) and the old "model hash" (64 KiB at 1 MiB), which
sd-scripts records as `ss_sd_model_hash`. Only single files have them; folders and built-ins have none."""
from __future__ import annotations

import hashlib
from pathlib import Path

from library.models.paths import SINGLE_FILE_SUFFIXES


def _single_file(model_path: str) -> Path | None:
    path = Path(model_path).expanduser()
    return path if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES else None


def a1111_short_hash(model_path: str) -> str | None:
    """SHA-256 of the whole file, first 10 hex digits (reads the file once: seconds for a 2 GB checkpoint)."""
    path = _single_file(model_path)
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def legacy_model_hash(model_path: str) -> str | None:
    """A1111's old model hash: SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    path = _single_file(model_path)
    if path is None:
        return None
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
