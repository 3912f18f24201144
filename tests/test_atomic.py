"""Atomic writes: a failed write leaves the old file; new files get normal permissions (not mkstemp's 0600)."""
import os

import pytest

from library.atomic import write_atomically, write_text_atomically


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("earlier")

    def crash(temporary):
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, crash)
    assert target.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_new_files_are_readable_by_others_per_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomically(tmp_path / "a.txt", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.txt").read_bytes() == b"x\n"
