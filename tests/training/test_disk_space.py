"""The planned saves counted from the [save] section, and a too-small disk refused by --check."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import train_lora
from library.training import disk_space
from library.training.disk_space import SaveSizes, planned_saves
from tests.helpers import write_run_config


def save(**values):
    base = dict(every_n_epochs=0, every_n_steps=0, keep_last=0, save_state=False)
    return SimpleNamespace(**{**base, **values})


def test_planned_saves_count_kept_intermediates_and_states():
    assert planned_saves(100, 1, save()).artifacts == 1
    assert planned_saves(100, 1, save()).states == 1  # a stop (Ctrl-C) writes one
    every = planned_saves(100, 1, save(every_n_steps=10))  # steps 10..90: 9 intermediates
    assert (every.artifacts, every.states) == (10, 1)
    kept = planned_saves(100, 1, save(every_n_steps=10, keep_last=2, save_state=True))
    assert (kept.artifacts, kept.states) == (4, 4)  # 2 kept + the next before pruning + the final
    assert kept.bytes(SaveSizes(artifact=10, state=100)) == 440
    epochs = planned_saves(50, 5, save(every_n_epochs=2))  # after epochs 2 and 4
    assert epochs.artifacts == 3


def test_check_refuses_a_disk_without_room_for_the_saves(tmp_path, monkeypatch, capsys):
    config = write_run_config(tmp_path, "[save]\noutput_dir = \"{tmp}/out\"\nname = \"t\"\nevery_n_steps = 1\n"
                                        "save_state = true\n")
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000, total=10**6,
                                                                                    used=0))
    with pytest.raises(SystemExit) as exit_:
        train_lora.main([str(config), "--check"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "save.output_dir: the run needs about" in err and "only 1.0 KB free" in err
    assert "save.save_state = false" in err
