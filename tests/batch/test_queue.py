"""scripts/train_queue.sh end to end on the built-in tiny model: a failing run does not stop the queue, the
summary (table + CSV) reports every run, Ctrl-C saves a resumable state and --resume continues from it."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from library.batch.entries import plan_entries
from library.training.run_summary import write_run_summary

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "sample_dataset" / "train"


def lora_config(tmp: Path, name: str, steps: int, extra: str = "") -> Path:
    train = tmp / "train"
    if not train.exists():
        shutil.copytree(SAMPLES, train)
    path = tmp / f"{name}.toml"
    path.write_text(f"""trainer = "lora"
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "train"
resolution = 64
[network]
rank = 4
[train]
max_steps = {steps}
batch_size = 2
num_threads = 1
[save]
output_dir = "out"
name = "{name}"
[logging]
log_dir = "logs"
{extra}""", encoding="utf-8")
    return path


def queue(tmp: Path, *args: str) -> subprocess.Popen:
    """The real script, as a user starts it; its console output goes to a file (a pipe nobody reads while the
    queue runs would fill up and stall it)."""
    env = {**os.environ, "KILN_PYTHON": sys.executable}
    console = open(tmp / f"console-{time.monotonic_ns()}.txt", "w+", encoding="utf-8")
    process = subprocess.Popen(["bash", str(REPO / "scripts" / "train_queue.sh"), *args], cwd=tmp, env=env,
                               stdout=console, stderr=subprocess.STDOUT, text=True)
    process.console = console
    return process


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    process.wait(timeout=timeout)
    process.console.seek(0)
    out = process.console.read()
    process.console.close()
    return process.returncode, out


def summary_rows(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_queue_runs_every_config_with_its_trainer_and_reports_the_failure(tmp_path):
    lora_config(tmp_path, "good", 3)
    # a textual-inversion config (named by its [embedding] section, no trainer key) whose images are missing
    (tmp_path / "broken.toml").write_text("""[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "no/such/folder"
[embedding]
name = "kilnpotx"
[train]
max_steps = 2
""", encoding="utf-8")
    code, out = finish(queue(tmp_path, "good.toml", "broken.toml", "train.seed=5", "--queue-dir", "q"))
    assert code == 1, out  # a run failed
    rows = summary_rows(tmp_path / "q")
    assert [(r["config"], r["trainer"], r["status"]) for r in rows] == [
        ("good.toml", "lora", "ok"), ("broken.toml", "textual_inversion", "failed")]
    good, broken = rows
    run = json.loads((tmp_path / "out" / "good.run.json").read_text())
    assert Path(tmp_path / good["output"]).is_file() and good["output"].endswith("good.safetensors")
    assert float(good["final_loss"]) == pytest.approx(run["final_loss"], rel=1e-5) and run["step"] == 3
    assert broken["exit_code"] == "2" and broken["output"] == "" and broken["final_loss"] == ""
    good_log = (tmp_path / good["log"]).read_text(encoding="utf-8")
    assert "train_lora.py good.toml train.seed=5" in good_log and "saved out/good.safetensors" in good_log
    broken_log = (tmp_path / broken["log"]).read_text(encoding="utf-8")
    assert "train_textual_inversion.py" in broken_log and "folder not found: no/such/folder" in broken_log
    table = out[out.index("queue summary:"):]  # the table names both runs with their status and loss
    assert "good.toml" in table and "ok" in table and f"{float(good['final_loss']):.4f}" in table
    assert "broken.toml" in table and "failed (exit 2)" in table and "2 run(s): 1 ok, 1 failed" in table


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_ctrl_c_saves_the_current_run_skips_the_rest_and_resume_continues(tmp_path):
    lora_config(tmp_path, "long", 20)
    lora_config(tmp_path, "short", 2)
    process = queue(tmp_path, "long.toml", "short.toml", "--queue-dir", "q1")
    # Ctrl-C once the first run has trained a step (its TensorBoard folder appears with the first step)
    wait_for(lambda: any((tmp_path / "logs").glob("long-*")), 240, "the first training step")
    process.send_signal(signal.SIGINT)
    code, out = finish(process)
    assert code == 130, out
    assert [(r["config"], r["status"]) for r in summary_rows(tmp_path / "q1")] == [
        ("long.toml", "interrupted"), ("short.toml", "skipped")]
    interrupted = json.loads((tmp_path / "out" / "long.run.json").read_text())
    assert interrupted["status"] == "interrupted" and Path(tmp_path / interrupted["resume_state"]).is_dir()
    assert "--resume" in out and not (tmp_path / "out" / "short.safetensors").exists()

    code, out = finish(queue(tmp_path, "--resume", "long.toml", "short.toml", "--queue-dir", "q2"))
    assert code == 0, out
    rows = summary_rows(tmp_path / "q2")
    assert [(r["config"], r["status"]) for r in rows] == [("long.toml", "ok"), ("short.toml", "ok")]
    long_log = (tmp_path / rows[0]["log"]).read_text(encoding="utf-8")
    assert f"save.resume={Path(interrupted['resume_state']).as_posix()}" in long_log
    assert f"resumed from {interrupted['resume_state']}: step {interrupted['step']}" in long_log
    assert json.loads((tmp_path / "out" / "long.run.json").read_text())["step"] == 20
    assert len(list((tmp_path / "logs").glob("long-*"))) == 1  # the resumed run went on in its TensorBoard run

    code, out = finish(queue(tmp_path, "--resume", "long.toml", "short.toml", "--queue-dir", "q3"), 120)
    assert code == 0, out
    assert [r["status"] for r in summary_rows(tmp_path / "q3")] == ["done earlier", "done earlier"]
    assert [r["output"] for r in summary_rows(tmp_path / "q3")] == [r["output"] for r in rows]


def test_resume_picks_the_state_to_continue_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("finished", "interrupted", "crashed", "fresh"):
        lora_config(tmp_path, name, 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "finished.safetensors").write_bytes(b"x")
    write_run_summary(out / "finished.run.json", "finished", output=str(out / "finished.safetensors"))
    for name, steps in (("interrupted-step00000004", 4), ("crashed-000001", 3), ("crashed-step00000006", 6)):
        (out / f"{name}-state").mkdir()
        (out / f"{name}-state" / "progress.json").write_text(json.dumps({"global_step": steps}))
    write_run_summary(out / "interrupted.run.json", "interrupted",
                      resume_state=str(out / "interrupted-step00000004-state"))
    write_run_summary(out / "crashed.run.json", "running")  # killed without a word: its newest state counts
    entries = plan_entries(["*.toml"], ["train.seed=1"], resume=True)
    by_name = {e.config.stem: e for e in entries}

    def resumed_from(name: str) -> Path:
        key, value = by_name[name].overrides[-1].split("=", 1)
        assert key == "save.resume" and by_name[name].overrides[0] == "train.seed=1"
        return Path(value).resolve()

    assert by_name["finished"].done_earlier
    assert resumed_from("interrupted") == (out / "interrupted-step00000004-state").resolve()
    assert resumed_from("crashed") == (out / "crashed-step00000006-state").resolve()
    assert by_name["fresh"].overrides == ["train.seed=1"] and not by_name["fresh"].done_earlier
    assert [e.trainer for e in entries] == ["lora"] * 4


def test_powershell_scripts_mirror_the_bash_ones():
    """No PowerShell on this machine (Debian has no package; its npm/PyPI wrappers download it at install
    time), so the .ps1 files are kept as thin mirrors: they must call the same Python entry points with the
    project venv and UTF-8 mode, and the .cmd starters must print the exact policy command."""
    for name, tool in (("train_queue", "tools/train_queue.py"), ("tensorboard", "tools/launch_tensorboard.py")):
        bash = (REPO / "scripts" / f"{name}.sh").read_text(encoding="utf-8")
        ps1 = (REPO / "scripts" / f"{name}.ps1").read_text(encoding="utf-8")
        cmd = (REPO / "scripts" / f"{name}.cmd").read_text(encoding="utf-8")
        assert f'"$ROOT/{tool}"' in bash and f'(Join-Path $Root "{tool}") @args' in ps1
        assert "KILN_PYTHON" in bash and "$env:KILN_PYTHON" in ps1
        assert '.venv\\Scripts\\python.exe' in ps1 and "$env:PYTHONUTF8 = \"1\"" in ps1 and "-X utf8" in ps1
        assert "exit $LASTEXITCODE" in ps1  # the queue's exit code (non-zero on a failed run) reaches the caller
        assert "Set-ExecutionPolicy -Scope CurrentUser -ExecutionPolicy RemoteSigned" in cmd
        assert f'-File "%~dp0{name}.ps1" %*' in cmd


@pytest.mark.skipif(shutil.which("pwsh") is None, reason="PowerShell (pwsh) is not installed")
def test_powershell_queue_runs(tmp_path):
    lora_config(tmp_path, "good", 2)
    env = {**os.environ, "KILN_PYTHON": sys.executable}
    done = subprocess.run(["pwsh", "-NoProfile", "-File", str(REPO / "scripts" / "train_queue.ps1"), "good.toml",
                           "--queue-dir", "q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["status"] for r in summary_rows(tmp_path / "q")] == ["ok"]
