"""TensorBoard logs as users see them: the real TensorBoard server (started by scripts/tensorboard.sh) serves a
finished run's loss curve, preview image and resolved config; a resumed run continues its TensorBoard run; a
run that fails before its first step leaves no empty run folder. Each run also writes <name>.run.json."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_lora
from library.batch.tensorboard import free_port
from library.training.trainer import Trainer
from tests.helpers import write_run_config

REPO = Path(__file__).resolve().parents[2]
BODY = """
[network]
rank = 4
[train]
max_steps = 4
batch_size = 2
seed = 3
[sample]
prompts = ["a kiln pot --w 64 --h 64 --s 2 --d 5"]
every_n_steps = 2
"""


def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def get_json(base: str, path: str, **query):
    return json.loads(get(f"{base}{path}?{urllib.parse.urlencode(query)}"))


def test_tensorboard_server_shows_loss_samples_and_config_of_a_finished_run(tmp_path, capsys):
    path = write_run_config(tmp_path, BODY)
    assert train_lora.main([str(path)]) == 0
    printed = capsys.readouterr().out
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("t-")
    assert f"scripts/tensorboard.sh {runs[0]}" in printed.replace("'", "")  # the launcher command, at start
    port = free_port("127.0.0.1", 16006)
    env = {**os.environ, "KILN_PYTHON": sys.executable}
    server = subprocess.Popen(["bash", str(REPO / "scripts" / "tensorboard.sh"), str(tmp_path / "logs"), "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, names = time.monotonic() + 120, []
        while time.monotonic() < deadline and not names:
            try:  # the server answers before it has read the logs: wait until the run is listed
                names = json.loads(get(f"{base}/data/runs", timeout=2))
            except OSError:
                pass
            time.sleep(0.5)
        assert names == [runs[0].name]
        run = names[0]
        loss = get_json(base, "/data/plugin/scalars/scalars", run=run, tag="loss/current")
        assert [step for _, step, _ in loss] == [1, 2, 3, 4] and all(v > 0 for _, _, v in loss)
        assert get_json(base, "/data/plugin/scalars/scalars", run=run, tag="lr/unet")
        images = get_json(base, "/data/plugin/images/images", run=run, tag="samples/00", sample=0)
        assert [entry["step"] for entry in images] == [2, 4]
        png = get(f"{base}/data/plugin/images/individualImage?{images[-1]['query']}")
        assert png.startswith(b"\x89PNG")
        text = get_json(base, "/data/plugin/text/text", run=run, tag="config/text_summary")
        assert "max_steps = 4" in text[0]["text"] and "[network]" in text[0]["text"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    summary = json.loads((tmp_path / "out" / "t.run.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 4 and summary["tensorboard"] == str(runs[0])
    assert summary["final_loss"] == pytest.approx(sum(v for _, _, v in loss) / 4)


def scalars(folder: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_resumed_run_continues_its_tensorboard_run(tmp_path, monkeypatch):
    path = write_run_config(tmp_path, "[train]\nmax_steps = 5\nbatch_size = 2\nseed = 3\n")
    original, calls = Trainer._optimizer_step, {"n": 0}

    def interrupt_on_third(self, loop):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, loop)

    monkeypatch.setattr(Trainer, "_optimizer_step", interrupt_on_third)
    with pytest.raises(SystemExit):
        train_lora.main([str(path)])
    interrupted = json.loads((tmp_path / "out" / "t.run.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["step"] == 2
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    assert train_lora.main([str(path), f"save.resume={interrupted['resume_state']}"]) == 0
    runs = list((tmp_path / "logs").iterdir())
    assert [str(r) for r in runs] == [interrupted["tensorboard"]]  # one TensorBoard run, not two
    assert scalars(runs[0], "loss/current") == [1, 2, 3, 4, 5]


def test_a_run_that_fails_before_its_first_step_leaves_no_run_folder(tmp_path, monkeypatch):
    def broken_loss(self, *args):
        raise FloatingPointError("the loss became NaN/inf at step 1.")

    monkeypatch.setattr(Trainer, "_loss", broken_loss)
    assert train_lora.main([str(write_run_config(tmp_path, ""))]) == 1  # an unexpected error: a bug's exit code
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    summary = json.loads((tmp_path / "out" / "t.run.json").read_text())
    assert summary["status"] == "failed" and summary["step"] == 0 and "NaN" in summary["error"]


def test_each_step_line_is_complete_when_the_step_ends(tmp_path, monkeypatch):
    """A reader of lines (a log tee, a GUI wrapper) gets step k's bar as step k ends, not when step k+1 starts."""
    import io
    import sys

    from library.training.logs import RunLog

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    log = RunLog(tmp_path / "tb", total_steps=5)
    for step in (1, 2, 3):
        log.step(step, 0.5, {"unet": 1e-4}, 0)
        text = stream.getvalue()
        assert text.endswith("\r")
        last_line = [part for part in text.split("\r") if part.strip()][-1]
        assert f"{step}/5" in last_line and "loss=0.5000" in last_line
    log.close()
