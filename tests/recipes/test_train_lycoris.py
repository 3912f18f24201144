"""train_lora.py with network.type = "loha" / "lokr" end to end on the built-in tiny model: it learns, writes
a LyCORIS file with sd-scripts' metadata, resumes and continues exactly, and bad LyCORIS settings stop the run
with one line before the model loads."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_lora
from library.models.builtin import build_builtin
from library.networks.merge import merge_network
from tests.helpers import training_set_loss, write_run_config

OTHER = {"loha": "lokr", "lokr": "loha"}


def network_config(tmp: Path, kind: str, lr: float = 2e-3) -> Path:
    return write_run_config(tmp, f'[network]\ntype = "{kind}"\nrank = 4\nalpha = 4\nconv_rank = 2\nconv_alpha = 1\n'
                                 f"[optimizer]\nlr = {lr}\n")


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("kind, lr, marker", [("loha", 2e-3, "hada_w1_a"), ("lokr", 5e-3, "lokr_w1")])
def test_training_lowers_the_loss_and_writes_a_lycoris_file(tmp_path, kind, lr, marker):
    path = network_config(tmp_path, kind, lr)
    assert train_lora.main([str(path), "train.max_steps=20", "network.conv_rank=0"]) == 0
    out = tmp_path / "out" / "t.safetensors"
    meta = metadata(out)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == kind
    assert meta["ss_network_dim"] == "4" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    weights = load_file(str(out))
    assert f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.{marker}" in weights
    assert f"lora_te_text_model_encoder_layers_0_mlp_fc1.{marker}" in weights
    assert not any("lora_down" in k for k in weights)

    parts = build_builtin("tiny-sd15")
    before = training_set_loss(parts, tmp_path / "train")
    merge_network(parts, {k: v.float() for k, v in weights.items()})
    after = training_set_loss(parts, tmp_path / "train")
    assert after < before * 0.95, (before, after)


RESUME_ARGS = ("train.max_steps=6", "train.gradient_accumulation_steps=2", "dataset.flip_aug=true",
               "dataset.shuffle_caption=true", "optimizer.scheduler=cosine", "optimizer.warmup_steps=2",
               "dataset.cache_latents=off", "save.precision=fp32")


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_resume_and_continue_from_a_file_are_exact(tmp_path, kind, capsys):
    path = network_config(tmp_path, kind)
    # LoKr at rank 4 on the tiny model: some layers get a low-rank w2, others a full one (alpha/rank vs scale 1)
    assert train_lora.main([str(path), *RESUME_ARGS, "save.every_n_steps=3", "save.save_state=true"]) == 0
    reference = load_file(str(tmp_path / "out" / "t.safetensors"))
    state = tmp_path / "out" / "t-step00000003-state"
    assert train_lora.main([str(path), *RESUME_ARGS, f"save.resume={state.as_posix()}",
                            f"save.output_dir={(tmp_path / 'b').as_posix()}"]) == 0
    resumed = load_file(str(tmp_path / "b" / "t.safetensors"))
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.allclose(reference[key], resumed[key], atol=1e-3, rtol=1e-3), key

    # network.init_weights: with a negligible lr the continued network is the file it started from
    first = (tmp_path / "out" / "t.safetensors").as_posix()
    assert train_lora.main([str(path), f"network.init_weights={first}", "save.name=c", "optimizer.lr=1e-12",
                            "save.precision=fp32", "train.max_steps=2"]) == 0
    assert "modules loaded" in capsys.readouterr().out
    continued = load_file(str(tmp_path / "out" / "c.safetensors"))
    assert all(torch.allclose(reference[k], continued[k], atol=1e-6) for k in reference)
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(path), f"network.init_weights={first}", "save.name=d", f"network.type={OTHER[kind]}"])
    assert info.value.code == 2
    assert f'is a {kind} file but network.type = "{OTHER[kind]}"' in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(path), f"network.init_weights={first}", "save.name=e", "network.alpha=2"])
    assert info.value.code == 2
    assert "the file's alpha [4.0] differs from network.alpha 2 / conv_alpha 1" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["network.type=lokr", "network.factor=3"], "network.factor = 3 does not divide the 32 outputs of lora_unet_"),
    (["network.type=lokr", "network.factor=0"], "network.factor = 0: use -1"),
    (["network.type=loha", "network.factor=8"], 'network.factor applies to network.type = "lokr" only'),
    (["network.type=loha", "network.dropout=0.1"], "network.dropout is LoRA's"),
    (["network.type=locon"], "'network.type' = 'locon'"),
])
def test_bad_lycoris_settings_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, overrides, message):
    path = network_config(tmp_path, "lora")
    monkeypatch.setattr("library.models.loading.load_model", lambda *a, **k: pytest.fail("the model must not load"))
    for check in ([], ["--check"]):
        with pytest.raises(SystemExit) as info:
            train_lora.main([str(path), *overrides, *check])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 2  # "error: <config>: 1 problem(s)" and the problem


def test_a_factor_only_the_loaded_model_can_check_is_one_line_after_it_loads(tmp_path, capsys, monkeypatch):
    """A .ckpt's shapes need unpickling: no skeleton before loading, so the factor is checked right after."""
    path = network_config(tmp_path, "lokr")
    monkeypatch.setattr("library.models.skeleton.model_skeleton", lambda *a, **k: None)
    assert train_lora.main([str(path), "network.factor=3", "--check"]) == 0  # nothing to check it against yet
    with pytest.raises(SystemExit) as info:
        train_lora.main([str(path), "network.factor=3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]
    assert "error: network.factor = 3 does not divide the 32 outputs of lora_unet_" in err


def test_check_shows_the_lycoris_settings(tmp_path, capsys):
    path = network_config(tmp_path, "lokr")
    assert train_lora.main([str(path), "network.factor=8", "--check"]) == 0
    assert "config and dataset OK" in capsys.readouterr().out
    assert train_lora.main([str(path), "network.factor=8", "--print-config"]) == 0  # the config, on request
    out = capsys.readouterr().out
    assert 'type = "lokr"' in out and "factor = 8" in out
