"""A loss that turns NaN: the run stops with one line naming the step, the learning-rate keys in effect and
their values, the precision and the last good save (train.nan_policy = "stop"); or skips the batch, up to
train.nan_skip_limit batches ("skip")."""
from __future__ import annotations

import json

import torch

import train_lora
from tests.faults.conftest import lora_run
from tests.faults.runner import final_tensors, run_child


def test_nan_stops_with_one_line_naming_the_settings(tmp_path):
    config, out = lora_run(tmp_path), tmp_path / "out"
    result = run_child(train_lora.main, [str(config), "network.unet_lr=0.002"], {"KILN_FAULTS": "loss:5=nan"})
    assert result.code == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    line = error[0]
    assert "step 5" in line and "network.unet_lr = 0.002" in line and "optimizer.lr = 0.0001 (for the text_encoder)" in line
    assert "train.mixed_precision = 'no'" in line
    assert f"last good save: {out / 't-step00000004.safetensors'}" in line and "nan_policy" in line
    summary = json.loads((out / "t.run.json").read_text())
    assert summary["status"] == "failed" and "NaN" in summary["error"]
    assert not (out / "t.safetensors").exists()  # nothing NaN-trained is saved as the result


def test_nan_skip_skips_the_batch_and_finishes(tmp_path):
    config, out = lora_run(tmp_path), tmp_path / "out"
    result = run_child(train_lora.main, [str(config), "train.nan_policy=skip"], {"KILN_FAULTS": "loss:3=nan"})
    assert result.code == 0, result.output[-3000:]
    assert "step 3: the loss is NaN/inf, batch skipped (1 of at most 10" in result.output
    assert all(torch.isfinite(t).all() for t in final_tensors(out).values())


def test_nan_skip_stops_past_its_limit(tmp_path):
    config = lora_run(tmp_path)
    result = run_child(train_lora.main, [str(config), "train.nan_policy=skip", "train.nan_skip_limit=1"],
                       {"KILN_FAULTS": "loss:3=nan,loss:4=nan"})
    assert result.code == 2, result.output[-3000:]
    assert "more than train.nan_skip_limit = 1 batches, the last at step 4" in result.output
