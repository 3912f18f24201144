"""bench/bench_scripts.py end to end on the built-in tiny model: it runs train_lora.py's main in a child process,
times its steps and the bare UNet+text-encoder cost, and reports them. No timing is asserted (this machine's
load decides those); what must hold is that every number is there and makes sense."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _row(text: str, script: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == script:
            return dict(zip(header, cells))
    raise AssertionError(f"no {script} row in:\n{text}")


def test_tiny_lora_run_reports_step_time_bare_time_and_ratio(tmp_path):
    docs = tmp_path / "BENCHMARKS.md"
    command = [sys.executable, str(REPO / "bench" / "bench_scripts.py"), "--model", "tiny", "--scripts", "lora",
               "--configs", "256-fp32", "--steps", "3", "--bare-iters", "2", "--threads", "1",
               "--cache", str(tmp_path / "cache"), "--write-docs", str(docs)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    row = _row(done.stdout, "lora")
    assert row["config"] == "256-fp32" and row["runs"] == "1"
    step, bare, ratio = float(row["s/step"]), float(row["bare s/step"]), float(row["ratio"])
    assert step > 0 and bare > 0
    assert abs(ratio - step / bare) < 0.01 + 0.002 * ratio  # the ratio is the two columns' quotient (rounded)
    assert 0 < float(row["setup s"]) < 300
    assert 0.1 < float(row["peak RSS steps GiB"]) <= float(row["peak RSS GiB"])
    # steps 2..3 were timed, the bare cost twice after its warm-up
    assert "lora 256-fp32 run 1: steps 2..3:" in done.stdout

    written = docs.read_text(encoding="utf-8")
    assert "## Machine" in written and "torch " in written and "| lora" in written
    assert _row(written, "lora")["s/step"] == row["s/step"]
    assert len(list((tmp_path / "cache" / "dataset" / "10_concept").glob("*.txt"))) == 8


def test_set_overrides_reach_every_run_as_on_the_scripts_command_line(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "bench_scripts.py"), "--model", "tiny", "--scripts", "lora",
               "--configs", "256-fp32", "--steps", "2", "--bare-iters", "1", "--threads", "1",
               "--cache", str(tmp_path / "cache"), "--set", "optimizer.max_grad_norm=0",
               "--set", "optimizer.max_grad_nrm=0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    # the misspelt key reaches train_lora.py, which refuses it by name before any model loads
    assert done.returncode != 0
    assert "python train_lora.py lora-256-fp32.toml optimizer.max_grad_norm=0 optimizer.max_grad_nrm=0" in done.stdout
    assert "max_grad_nrm" in done.stderr and "Traceback" not in done.stderr
