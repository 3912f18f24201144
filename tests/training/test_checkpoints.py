"""Run outputs: names, the resumable state round trip, keep-last pruning of this run's files only, and
recognising an earlier run's files."""
import json

import pytest
import torch

from library.training.checkpoints import (Progress, epoch_file, existing_outputs, final_file, load_state,
                                          prune_saved, save_state, state_dir_for, step_file)


def optimizer_and_scheduler():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    param.grad = torch.full((3,), 0.5)
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def test_state_round_trips_every_part(tmp_path):
    optimizer, scheduler = optimizer_and_scheduler()
    trained = {"a.weight": torch.randn(2, 2)}
    folder = tmp_path / "run-state"
    save_state(folder, Progress(7, 1, 3), trained, optimizer, scheduler, extra={"seed": 5})
    state = load_state(folder)
    assert state.progress == Progress(7, 1, 3) and state.extra == {"seed": 5}
    assert torch.equal(state.trainable["a.weight"], trained["a.weight"])
    assert state.optimizer["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert state.scheduler["last_epoch"] == 1 and state.scaler is None
    assert not list(tmp_path.glob(".*.tmp"))  # written beside, then moved into place
    assert json.loads((folder / "progress.json").read_text())["global_step"] == 7


def test_incomplete_state_names_what_is_missing(tmp_path):
    folder = tmp_path / "broken-state"
    folder.mkdir()
    (folder / "progress.json").write_text("{}")
    with pytest.raises(ValueError, match="missing trainable.safetensors, optimizer.pt, scheduler.pt"):
        load_state(folder)


def test_keep_last_prunes_only_this_runs_intermediates_with_their_states_and_sidecars(tmp_path):
    earlier = step_file(tmp_path, "t", 900, ".pt")
    earlier.write_bytes(b"an earlier run")
    saved = []
    for step in (10, 20, 30):
        path = step_file(tmp_path, "t", step, ".pt")
        path.write_bytes(b"x")
        path.with_name(path.name + ".optim").write_bytes(b"o")
        state_dir_for(path).mkdir()
        saved.append(path)
        prune_saved(saved, keep_last=2)
    assert saved == [step_file(tmp_path, "t", s, ".pt") for s in (20, 30)]
    gone = step_file(tmp_path, "t", 10, ".pt")
    assert not gone.exists() and not state_dir_for(gone).exists() and not gone.with_name(gone.name + ".optim").exists()
    assert earlier.exists() and state_dir_for(saved[0]).is_dir()


def test_existing_outputs_finds_this_names_files_only(tmp_path):
    mine = [final_file(tmp_path, "t", ".safetensors"), epoch_file(tmp_path, "t", 2, ".safetensors"),
            step_file(tmp_path, "t", 40, ".safetensors")]
    for path in mine:
        path.write_bytes(b"")
    state_dir_for(mine[0]).mkdir()
    (tmp_path / "t2.safetensors").write_bytes(b"")
    (tmp_path / "other-000001.safetensors").write_bytes(b"")
    assert existing_outputs(tmp_path, "t") == sorted(mine + [state_dir_for(mine[0])])


def test_temporaries_are_those_of_this_run_name_only(tmp_path):
    from library.training.checkpoints import remove_temporaries, temporaries

    ours = [".t.safetensors.ab_c12x9.tmp", ".t-step00000002.safetensors.k3j_2abc.tmp", ".t-step00000002-state.tmp",
            ".t-step00000002-state.old-1234", ".t.run.json.abcd_123.tmp", ".t.pt.optim.abcdefgh.tmp",
            ".t.tmp-abc_123", ".t.old-99", ".t-000002.safetensors.zzzzzzzz.tmp"]
    others = [".t-2.safetensors.abcdefgh.tmp", ".tx.safetensors.abcdefgh.tmp", ".t-step00000002.safetensors",
              "t.safetensors.abcdefgh.tmp", ".t-2-state.tmp", "t.safetensors"]
    for name in ours + others:
        (tmp_path / name).write_text("")
    assert sorted(p.name for p in temporaries(tmp_path, "t")) == sorted(ours)
    remove_temporaries(tmp_path, "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)


def test_ema_twins_count_as_outputs_and_are_pruned_with_their_artifact(tmp_path):
    from library.training.checkpoints import existing_outputs, remove_artifact

    for name in ("t-000001.safetensors", "t-000001-ema.safetensors", "t-ema.safetensors", "other.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    found = [p.name for p in existing_outputs(tmp_path, "t")]
    assert found == ["t-000001-ema.safetensors", "t-000001.safetensors", "t-ema.safetensors"]
    remove_artifact(tmp_path / "t-000001.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors", "t-ema.safetensors"]
