"""train_lora.py end to end on the built-in tiny model: it learns, saves what tools load, and resumes exactly."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_lora
from library.networks.merge import merge_network
from library.models.builtin import build_builtin
from library.training.trainer import Trainer
from tests.helpers import training_set_loss

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "sample_dataset" / "train"


def config_text(tmp: Path, **extra: str) -> Path:
    dataset = tmp / "train"
    if not dataset.exists():
        shutil.copytree(SAMPLES, dataset)
    text = f"""
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{dataset.as_posix()}"
resolution = 64
[network]
rank = 4
alpha = 4
[optimizer]
lr = 2e-3
[train]
max_steps = 6
batch_size = 2
seed = 7
[save]
output_dir = "{(tmp / 'out').as_posix()}"
name = "t"
[logging]
log_dir = "{(tmp / 'logs').as_posix()}"
"""
    path = tmp / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run(path: Path, *overrides: str) -> int:
    return train_lora.main([str(path), *overrides])


def test_training_lowers_denoising_loss_and_file_has_kohya_layout(tmp_path):
    path = config_text(tmp_path)
    assert run(path, "train.max_steps=40", "network.rank=8", "dataset.flip_aug=false",
               "network.unet_lr=2e-3", "network.text_encoder_lr=5e-4") == 0
    out = tmp_path / "out" / "t.safetensors"
    weights = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"  # a float, as sd-scripts writes it
    assert meta["ss_steps"] == "40" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_dataset_dirs"])["10_kiln pot"]["n_repeats"] == 10
    assert "kiln pot" in json.loads(meta["ss_tag_frequency"])["10_kiln pot"]
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in weights)
    assert any(k.startswith("lora_unet_") for k in weights)
    assert all(v.dtype == torch.float16 for v in weights.values())  # save.precision default

    parts = build_builtin("tiny-sd15")
    before = training_set_loss(parts, tmp_path / "train")
    merge_network(parts, {k: v.float() for k, v in weights.items()})
    after = training_set_loss(parts, tmp_path / "train")
    assert after < before * 0.97, (before, after)

    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/current", "loss/average", "loss/epoch", "lr/unet", "lr/text_encoder"} <= tags
    assert len(accumulator.Scalars("loss/current")) == 40
    assert accumulator.Scalars("lr/unet")[-1].value == pytest.approx(2e-3)  # separate learning rates
    assert accumulator.Scalars("lr/text_encoder")[-1].value == pytest.approx(5e-4)


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    path = config_text(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "t.safetensors").write_bytes(b"earlier run")
    with pytest.raises(SystemExit) as info:
        run(path)
    assert info.value.code == 2
    assert "already holds output of a run named 't'" in capsys.readouterr().err
    assert (tmp_path / "out" / "t.safetensors").read_bytes() == b"earlier run"


def test_check_prints_summary_with_arithmetic_and_does_not_train(tmp_path, capsys):
    path = config_text(tmp_path)
    assert run(path, "--check", "train.max_steps=100") == 0
    out = capsys.readouterr().out
    assert "60 training samples" in out  # 6 images × 10 repeats
    assert "ceil(60 / batch size 2) = 30" in out
    assert "ceil(100 / 30) = 4 epoch(s)" in out
    assert not (tmp_path / "out").exists()


RESUME_ARGS = ("train.max_steps=6", "train.gradient_accumulation_steps=2", "dataset.flip_aug=true",
               "dataset.shuffle_caption=true", "network.dropout=0.1", "optimizer.scheduler=cosine",
               "optimizer.warmup_steps=2", "dataset.cache_latents=off")


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "t.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-3, rtol=1e-3), key


def test_resume_and_ctrl_c_end_with_the_same_weights(tmp_path, monkeypatch, capsys):
    path = config_text(tmp_path)
    out = tmp_path / "out"
    # 1) uninterrupted, keeping a resumable state at step 3
    assert run(path, *RESUME_ARGS, "save.every_n_steps=3", "save.save_state=true", "save.precision=fp32") == 0
    reference = final_weights(out)
    state = out / "t-step00000003-state"
    assert json.loads((state / "progress.json").read_text())["global_step"] == 3

    # 2) resume from the step-3 state in a fresh output folder
    assert run(path, *RESUME_ARGS, f"save.resume={state.as_posix()}", f"save.output_dir={(tmp_path / 'b').as_posix()}",
               "save.precision=fp32") == 0
    assert_same(reference, final_weights(tmp_path / "b"))

    # 3) Ctrl-C during step 3 saves step 2 and its state; resuming from it ends identically
    original = Trainer._optimizer_step
    calls = {"n": 0}

    def interrupt_on_third(self, loop):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, loop)

    monkeypatch.setattr(Trainer, "_optimizer_step", interrupt_on_third)
    c_out = (tmp_path / "c").as_posix()
    with pytest.raises(SystemExit) as info:
        run(path, *RESUME_ARGS, f"save.output_dir={c_out}", "save.precision=fp32")
    assert info.value.code == 130
    interrupted = tmp_path / "c" / "t-step00000002-state"
    out_text = capsys.readouterr().out
    command = out_text.split("continue with:\n", 1)[1].splitlines()[0].strip()
    # the full command that continues: the script, the config, the original overrides, and the state
    assert "train_lora.py" in command and path.as_posix() in command and f"save.output_dir={c_out}" in command
    assert command.endswith(f"save.resume={interrupted}")
    assert (tmp_path / "c" / "t-step00000002.safetensors").is_file() and interrupted.is_dir()
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    assert run(path, *RESUME_ARGS, f"save.output_dir={c_out}", f"save.resume={interrupted.as_posix()}",
               "save.precision=fp32") == 0
    assert_same(reference, final_weights(tmp_path / "c"))


def test_epoch_saves_are_named_and_pruned(tmp_path):
    path = config_text(tmp_path)
    # 60 samples / batch 6 = 10 steps per epoch; 4 epochs; save every epoch, keep the last 2
    assert run(path, "train.max_steps=40", "train.batch_size=6", "save.every_n_epochs=1", "save.keep_last=2") == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["t-000002.safetensors", "t-000003.safetensors", "t.run.json", "t.safetensors"]


def test_adamw_steps_fused_by_default_and_foreach_and_loop_train_the_same_file(tmp_path, capsys):
    assert run(config_text(tmp_path)) == 0  # AdamW: fused by default
    assert "optimizer: AdamW (fused step)" in capsys.readouterr().out
    fused = load_file(str(tmp_path / "out" / "t.safetensors"))
    shutil.rmtree(tmp_path / "out")
    assert run(config_text(tmp_path), "optimizer.args={foreach=true}") == 0
    assert "optimizer: AdamW(foreach=True) (foreach step)" in capsys.readouterr().out
    batched = load_file(str(tmp_path / "out" / "t.safetensors"))
    shutil.rmtree(tmp_path / "out")
    assert run(config_text(tmp_path), "optimizer.args={foreach=false}") == 0
    looped = load_file(str(tmp_path / "out" / "t.safetensors"))
    assert all(torch.equal(batched[key], looped[key]) for key in batched)  # foreach is the loop, batched
    # fused rounds differently: the same training within float noise, not bit for bit
    assert max((fused[k].float() - batched[k].float()).abs().max().item() for k in fused) < 1e-3
    assert any(not torch.equal(fused[k], batched[k]) for k in fused)


@pytest.mark.parametrize("user_env", [None, "1"])
def test_inductor_on_the_cpu_compiles_without_its_layout_optimization_unless_the_user_set_it(
        tmp_path, monkeypatch, capsys, user_env):
    import torch._inductor.config as inductor_config

    if user_env is None:
        monkeypatch.delenv("TORCHINDUCTOR_LAYOUT_OPTIMIZATION", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_LAYOUT_OPTIMIZATION", user_env)
    compiled = []
    # inductor's C++ codegen takes minutes; what matters here is the setting in force when the UNet compiles
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kw: compiled.append(kw["backend"]))
    with inductor_config.patch(layout_optimization=True):  # inductor's default; the patch restores it after
        assert run(config_text(tmp_path), "train.torch_compile=true", "train.max_steps=1") == 0
        in_force = inductor_config.layout_optimization
    out = capsys.readouterr().out
    assert compiled == ["inductor"]
    said = "UNet: inductor's layout optimization off on the CPU"
    if user_env is None:
        assert said in out and in_force is False
    else:
        assert said not in out and in_force is True


@pytest.mark.parametrize("option", ["train.channels_last=true", "train.torch_compile=true"])
def test_speed_options_train_the_same_file(tmp_path, option, capsys):
    from torch._dynamo.utils import counters

    assert run(config_text(tmp_path)) == 0
    plain = load_file(str(tmp_path / "out" / "t.safetensors"))
    shutil.rmtree(tmp_path / "out")
    counters.clear()
    # the eager backend runs dynamo's capture of the UNet (with its LoRA layers) without minutes of C++ codegen
    assert run(config_text(tmp_path), option, 'train.dynamo_backend="eager"') == 0
    said = "UNet: channels-last" if "channels" in option else "UNet: torch.compile with the eager backend"
    assert said in capsys.readouterr().out
    if "compile" in option:
        assert counters["stats"]["unique_graphs"] > 0  # the UNet's forward really went through dynamo
    assert_same(plain, load_file(str(tmp_path / "out" / "t.safetensors")))
