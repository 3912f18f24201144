"""Output folders that cannot take the run's files: a file where the folder should be, a read-only disk, a disk
too small for the planned saves (all refused by --check and before the model loads), and a disk that fills up
during the run (the failed save is reported in one line, training goes on, the next save retries, and the
result that cannot be written goes to a rescue folder that the error names, with the command to continue)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import train_lora
from tests.faults.conftest import lora_run
from tests.faults.runner import assert_same, exit_code, final_tensors, run_child


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (root only); skips the test where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small disk needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_output_dir_that_is_a_file_is_refused_by_check(tmp_path, capsys):
    config = lora_run(tmp_path)
    (tmp_path / "outfile").write_text("")
    assert exit_code(train_lora.main, [str(config), f"save.output_dir={tmp_path / 'outfile'}", "--check"]) == 2
    err = capsys.readouterr().err
    assert "save.output_dir" in err and "is a file" in err and "Traceback" not in err


def test_read_only_output_disk_is_refused_before_the_model_loads(tmp_path, capsys):
    config = lora_run(tmp_path)
    with small_disk(tmp_path / "ro", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for extra in (["--check"], []):
            assert exit_code(train_lora.main, [str(config), f"save.output_dir={disk / 'out'}", *extra]) == 2
            err = capsys.readouterr().err
            assert "save.output_dir" in err and "not writable" in err, err


def test_disk_too_small_for_the_planned_saves_is_refused(tmp_path, capsys):
    config = lora_run(tmp_path)
    with small_disk(tmp_path / "small", "256k") as disk:
        assert exit_code(train_lora.main, [str(config), f"save.output_dir={disk}", "--check"]) == 2
        err = capsys.readouterr().err
        assert "save.output_dir: the run needs about" in err and "free" in err and "save.keep_last" in err, err


def test_free_space_estimate_matches_the_files_written(tmp_path, capsys):
    """The estimate --check prints is within a factor of two of what the run writes."""
    config = lora_run(tmp_path)
    assert exit_code(train_lora.main, [str(config), "--check"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "save.output_dir: about" in l)
    per_file = _bytes(line.split("(about ")[1].split(" per file")[0])
    per_state = _bytes(line.split("per file, ")[1].split(" per state")[0])
    assert exit_code(train_lora.main, [str(config)]) == 0
    out = tmp_path / "out"
    artifact = (out / "t.safetensors").stat().st_size
    state = sum(p.stat().st_size for p in (out / "t-state").iterdir())
    assert artifact / 2 <= per_file <= artifact * 2, (per_file, artifact)
    assert state / 2 <= per_state <= state * 2, (per_state, state)


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_a_failed_save_is_reported_and_training_goes_on(reference_run, tmp_path):
    """ENOSPC on the step-4 save (injected): one line with path and errno, the run goes on, the step-6 save
    works, and the result equals the uninterrupted run's."""
    config, out = lora_run(tmp_path), tmp_path / "out"
    result = run_child(train_lora.main, [str(config)], {"KILN_FAULTS": "artifact-write:3=enospc"})
    assert result.code == 0, result.output[-3000:]
    assert "could not save" in result.output and "errno 28" in result.output and "next save tries again" in result.output
    assert not (out / "t-step00000004.safetensors").exists() and (out / "t-step00000006.safetensors").is_file()
    assert_same(reference_run[0], final_tensors(out))


def test_a_disk_that_fills_up_sends_the_result_to_a_rescue_folder(reference_run, tmp_path):
    """The disk really fills up at step 3 (a small tmpfs, where root may mount one): every later save fails,
    the result and a state go to ~/.kiln-rescue, the error names it and the command that continues; after
    space is freed, that command ends bit-exact."""
    home, config = tmp_path / "home", lora_run(tmp_path)
    with small_disk(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        faults = {"KILN_FAULTS": "step:3=fill", "KILN_FAULTS_FILL": str(disk), "HOME": str(home)}
        result = run_child(train_lora.main, [str(config), f"save.output_dir={out}"], faults)
        _check_rescue(result, home, reference_run[0], out, lambda: (disk / "kiln-fault-filler").unlink())


def test_a_full_disk_injected_sends_the_result_to_a_rescue_folder(reference_run, tmp_path):
    """The same with the saves' writes failing with ENOSPC (injected; runs everywhere, root or not)."""
    home, config = tmp_path / "home", lora_run(tmp_path)
    faults = ",".join(f"artifact-write:{n}=enospc" for n in (3, 4, 5))  # step 4, 6 and the final save fail
    result = run_child(train_lora.main, [str(config)], {"KILN_FAULTS": faults, "HOME": str(home)})
    _check_rescue(result, home, reference_run[0], tmp_path / "out", lambda: None)


def _check_rescue(result, home: Path, reference, out: Path, free_space) -> None:
    assert result.code == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    rescued = sorted((home / ".kiln-rescue").glob("t-*/t.safetensors"))
    assert len(rescued) == 1, result.output[-3000:]
    error = [l for l in result.output.splitlines() if l.startswith("error:")][-1]
    assert str(rescued[0]) in error and "continue with:" in error
    free_space()
    args = error.split("continue with: ", 1)[1].split()[2:]
    resumed = run_child(train_lora.main, args)
    assert resumed.code == 0, resumed.output[-3000:]
    assert_same(reference, final_tensors(out))
