"""train_lora.py on the other paths users take: SD2 v-prediction from a single file, reg images, mixed
precision with gradient checkpointing, bad images, continuing from a LoRA file, impossible devices."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_lora
from library.models.builtin import build_builtin
from library.models.single_file import save_single_file

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "sample_dataset"


def make_config(tmp: Path, model: str, extra: str = "") -> Path:
    if not (tmp / "data").exists():
        shutil.copytree(SAMPLES, tmp / "data")
    text = f"""
[model]
path = "{model}"
[dataset]
train_dir = "{(tmp / 'data' / 'train').as_posix()}"
resolution = 64
[network]
rank = 2
alpha = 1
[train]
max_steps = 3
seed = 1
[save]
output_dir = "{(tmp / 'out').as_posix()}"
name = "v"
[logging]
log_dir = "{(tmp / 'logs').as_posix()}"
{extra}
"""
    path = tmp / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_sd2_v_prediction_single_file_with_reg_bf16_and_checkpointing(tmp_path, capsys):
    model_file = tmp_path / "tiny-sd2.safetensors"
    save_single_file(build_builtin("tiny-sd2"), model_file, dtype=torch.float32)
    path = make_config(tmp_path, model_file.as_posix())
    overrides = [f"dataset.reg_dir={(tmp_path / 'data' / 'reg').as_posix()}", "dataset.prior_loss_weight=0.5",
                 "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "train.min_snr_gamma=5",
                 "train.noise_offset=0.05", "model.clip_skip=2", "network.conv_rank=2", "train.batch_size=2"]
    assert train_lora.main([str(path), *overrides]) == 0
    out = capsys.readouterr().out
    assert "attention: PyTorch SDPA" in out  # the one-line backend report
    assert "regularisation samples" in out
    meta = metadata(tmp_path / "out" / "v.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["modelspec.prediction_type"] == "v"
    assert meta["ss_num_reg_images"] == "60"  # 4 reg images balanced up to the 60 training samples
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    weights = load_file(str(tmp_path / "out" / "v.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert any("resnets" in k for k in weights)


def test_bad_image_stops_the_run_unless_skipped(tmp_path, capsys):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    bad = tmp_path / "data" / "train" / "10_kiln pot" / "broken.jpg"
    good = (tmp_path / "data" / "train" / "10_kiln pot" / "kiln_pot_02.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "skip_bad_images" in err
    assert train_lora.main([str(path), "dataset.skip_bad_images=true"]) == 0
    assert metadata(tmp_path / "out" / "v.safetensors")["ss_num_train_images"] == "60"


def test_continue_from_lora_file(tmp_path, capsys):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    assert train_lora.main([str(path), "save.precision=fp32"]) == 0
    first = tmp_path / "out" / "v.safetensors"
    assert train_lora.main([str(path), f"network.init_weights={first.as_posix()}", "save.name=v2",
                            "optimizer.lr=1e-12", "save.precision=fp32"]) == 0
    assert "modules loaded" in capsys.readouterr().out
    a, b = load_file(str(first)), load_file(str(tmp_path / "out" / "v2.safetensors"))
    # with a negligible lr the continued network is the file it started from
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(path), f"network.init_weights={first.as_posix()}", "save.name=v3", "network.rank=4"])
    assert info.value.code == 2
    assert "file has rank 2, the network is configured with rank 4" in capsys.readouterr().err


def test_impossible_device_fails_before_model_loads(tmp_path, capsys, monkeypatch):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train_lora.main([str(path), "train.device=cuda"])
    assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lora.main([str(path), "train.mixed_precision=fp16"])
    assert "fp16' needs a GPU" in capsys.readouterr().err


def test_same_config_same_weights_and_memory_cache_encodes_each_image_once(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    calls = {"images": 0}
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        calls["images"] += x.shape[0]
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    path = make_config(tmp_path, "builtin:tiny-sd15")
    args = [str(path), "dataset.flip_aug=true", "train.max_steps=8", "save.precision=fp32"]
    assert train_lora.main(args) == 0
    assert calls["images"] == 12  # 6 images + their flipped copies, once, though 8 steps ran
    assert train_lora.main(args + ["save.name=again"]) == 0
    a, b = load_file(str(tmp_path / "out" / "v.safetensors")), load_file(str(tmp_path / "out" / "again.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_explicit_subsets_and_print_config(tmp_path, capsys):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    text = path.read_text().replace(f'train_dir = "{(tmp_path / "data" / "train").as_posix()}"\n', "")
    text += f"""
[[dataset.subsets]]
image_dir = "{(tmp_path / 'data' / 'train' / '10_kiln pot').as_posix()}"
repeats = 3
class_tokens = "kiln pot"
[[dataset.subsets]]
image_dir = "{(tmp_path / 'data' / 'reg' / '1_pot').as_posix()}"
repeats = 2
is_reg = true
"""
    path.write_text(text, encoding="utf-8")
    assert train_lora.main([str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "6 images x 3 repeats = 18 samples" in out
    assert "18 training samples + 18 regularisation samples = 36 samples" in out
    assert train_lora.main([str(path), "--print-config", "network.rank=5"]) == 0
    printed = capsys.readouterr().out
    import tomllib
    resolved = tomllib.loads(printed)
    assert resolved["network"]["rank"] == 5 and resolved["dataset"]["subsets"][1]["is_reg"] is True
    assert resolved["optimizer"]["name"] == "AdamW"  # defaults are shown too


def test_keep_last_prunes_only_this_runs_files_and_final_counts_every_epoch(tmp_path):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "v-step00000099.safetensors"  # an earlier run's file with a higher step number
    earlier.write_bytes(b"earlier run")
    args = [str(path), "save.overwrite=true", "train.max_steps=6", "save.every_n_steps=2", "save.keep_last=1"]
    assert train_lora.main(args) == 0
    assert earlier.read_bytes() == b"earlier run"
    assert sorted(p.name for p in out.glob("v-step*")) == ["v-step00000004.safetensors", "v-step00000099.safetensors"]
    # 60 samples / batch 6 = 10 steps per epoch: 20 steps = 2 whole epochs, so the final file says epoch 2
    assert train_lora.main([str(path), "save.name=e", "train.max_steps=20", "train.batch_size=6",
                            "optimizer.warmup_ratio=0.25"]) == 0
    assert metadata(out / "e.safetensors")["ss_epoch"] == "2"
    assert metadata(out / "e.safetensors")["ss_lr_warmup_steps"] == "5"  # 0.25 × 20 steps


def test_clip_skip_beyond_the_text_encoder_is_one_line(tmp_path, capsys):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    assert train_lora.main([str(path), "model.clip_skip=5"]) == 2
    assert "model.clip_skip = 5 but the text encoder has 2 layers" in capsys.readouterr().err


def test_resume_with_other_batching_is_refused(tmp_path, capsys):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    assert train_lora.main([str(path), "save.every_n_steps=2", "save.save_state=true"]) == 0
    state = (tmp_path / "out" / "v-step00000002-state").as_posix()
    assert train_lora.main([str(path), f"save.resume={state}", "train.batch_size=2", "save.name=r"]) == 2
    assert "batch_size 1 → 2" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.args={betas=5}"], "optimizer: AdamW"),
    (["optimizer.warmup_steps=500"], "longer than the whole run"),
    (["save.name=.."], "'save.name'"),
    (["dataset.cache_latents=disk", "dataset.cache_dir={file}/cache"], "dataset.cache_dir: cannot write"),
])
def test_late_failures_are_caught_before_the_model_loads(tmp_path, capsys, monkeypatch, overrides, message):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    monkeypatch.setattr("library.models.loading.load_model", lambda *a, **k: pytest.fail("the model must not load"))
    overrides = [o.replace("{file}", path.as_posix()) for o in overrides]  # a file cannot hold a folder
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(path), *overrides])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_init_weights_that_is_not_a_lora_file_is_a_clear_error(tmp_path, capsys):
    path = make_config(tmp_path, "builtin:tiny-sd15")
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(path), f"network.init_weights={path.as_posix()}"])
    assert info.value.code == 2
    assert "is not a readable .safetensors LoRA file" in capsys.readouterr().err
