"""The step plan as --check shows it (repeats × images → samples → batches → steps) and --suggest-repeats."""
import shutil

import pytest

import train_lora
from library.training.plan import FolderCount, make_plan, suggest_repeats
from tests.helpers import write_run_config


def plan_for(folders, batch=1, epochs=10, reg=0, accumulation=1):
    train = sum(f.images * f.repeats for f in folders)
    reg_samples = max(reg, train) if reg else 0
    batches = -(-(train + reg_samples) // batch)
    return make_plan(train, reg_samples, batch, batches, accumulation, None, epochs, tuple(folders))


def test_the_seed_tutorial_sum_32_images_10_epochs_4800_steps_is_15_repeats():
    plan = plan_for([FolderCount("train/10_subject", 32, 10, "rename the folder to {}_subject")])
    lines = suggest_repeats(plan, 4800, 10)
    text = "\n".join(lines)
    assert "4800 steps / 10 epochs = 480 steps × 1 images per step = 480 samples" in text
    assert "train/10_subject: 32 images × 15 repeats = 480 samples  (rename the folder to 15_subject)" in text
    assert "= 4800 steps (exactly)" in text


def test_several_folders_keep_their_ratio_and_reg_images_count_double():
    folders = [FolderCount("a", 20, 10, "set dataset.subsets[0].repeats = {}"), FolderCount("b", 10, 5, "b→{}")]
    text = "\n".join(suggest_repeats(plan_for(folders, batch=2, epochs=5), 1500, 5))
    # 1500 / 5 = 300 steps × 2 = 600 samples = 20 × 24 + 10 × 12: a's repeats stay twice b's
    assert "a: 20 images × 24 repeats" in text and "b: 10 images × 12 repeats" in text and "(exactly)" in text
    assert "set dataset.subsets[0].repeats = 24" in text
    with_reg = "\n".join(suggest_repeats(plan_for(folders[:1], batch=1, epochs=2, reg=5), 800, 2, own_reg=5))
    # 400 samples per epoch, half of them reg images raised to match: 200 training samples = 20 × 10
    assert "a: 20 images × 10 repeats = 200 samples  (unchanged)" in with_reg and "800 steps (exactly)" in with_reg
    near = "\n".join(suggest_repeats(plan_for([FolderCount("c", 7, 1)], batch=4, epochs=3), 100, 3))
    assert "the nearest to 100" in near


def test_check_shows_the_sum_and_suggests_repeats(tmp_path, capsys):
    path = write_run_config(tmp_path, "[train]\nepochs = 4\nbatch_size = 2\nseed = 3\n")
    assert train_lora.main([str(path), "--suggest-repeats", "300"]) == 0  # a check: nothing trains
    out = capsys.readouterr().out
    assert "samples per epoch : 6 images × 10 repeats = 60 training samples" in out
    assert "total steps       : 4 epochs × 30 = 120" in out
    assert "6 images × 25 repeats = 150 samples  (rename the folder to 25_kiln pot)" in out
    assert "4 epochs × ceil(150 / batch size 2) = 75 batches per epoch = 300 steps (exactly)" in out
    assert not (tmp_path / "out").exists()
    # the suggestion is right: renamed, the folder plans 300 steps
    shutil.move(tmp_path / "train" / "10_kiln pot", tmp_path / "train" / "25_kiln pot")
    assert train_lora.main([str(path), "--check"]) == 0
    assert "total steps       : 4 epochs × 75 = 300" in capsys.readouterr().out


def test_suggest_repeats_needs_epochs(tmp_path, capsys):
    path = write_run_config(tmp_path, "")
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(path), "--suggest-repeats", "300"])
    assert info.value.code == 2 and "add train.epochs=N" in capsys.readouterr().err
    assert train_lora.main([str(path), "--suggest-repeats", "300", "train.epochs=2"]) == 0


def test_check_under_accelerate_launch_shows_the_per_process_batch_and_the_same_steps(tmp_path, capsys, monkeypatch):
    path = write_run_config(tmp_path, "[train]\nepochs = 2\nbatch_size = 4\nseed = 3\n")
    assert train_lora.main([str(path), "--check"]) == 0
    alone = capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun (accelerate launch --num_processes 2) sets
    monkeypatch.setenv("RANK", "0")
    assert train_lora.main([str(path), "--check"]) == 0
    shared = capsys.readouterr().out
    assert ("processes         : data-parallel on 2 processes, each takes 2 of every batch of 4 "
            "(train.batch_size is the global batch)") in shared
    assert "data-parallel" not in alone
    steps = [line for line in alone.splitlines() if line.strip().startswith(("batches per epoch", "total steps"))]
    assert steps and all(line in shared for line in steps)  # the step arithmetic does not change
