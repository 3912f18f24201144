"""LyCORIS LoHa and LoKr: the file's tensors, applied with the formula A1111's built-in Lora extension and ComfyUI
use (written out here on its own, from REFERENCE.md), change each layer exactly as the trained network did —
Linear, 1x1 and 3x3 convolutions, LoKr with and without a low-rank factor, CP/Tucker files — and merging a
file into the tiny model reproduces the trained network's outputs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoKrConfig
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from torch import nn

from library.models.builtin import build_builtin
from library.networks.base import NetworkSpec, Target
from library.networks.kinds import kind_of_weights
from library.networks.loha import LOHA
from library.networks.lokr import LOKR, factor_problem
from library.networks.merge import merge_network
from library.networks.peft_lycoris import inject_lycoris, lycoris_state_dict
from library.networks.targets import network_targets


def a1111_delta(file: dict[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """ΔW as A1111 (network_hada.py / network_lokr.py) and ComfyUI (weight_adapter/loha.py, lokr.py) build it:
    scale = alpha / dim, where dim is hada_w1_b's rank (LoHa) or the rank of LoKr's low-rank factor (w2_b's over
    w1_b's); no alpha or no low-rank factor → scale 1. Flattened factors are reshaped to the weight."""
    def t(key):
        return file.get(f"{name}.{key}")

    def cp(core, w_a, w_b):  # Tucker core [r, r, kh, kw], w_a [r, out], w_b [r, in] → [out, in, kh, kw]
        return torch.einsum("ijkl,jr,ip->prkl", core, w_b, w_a)

    if t("hada_w1_a") is not None:
        sides = [cp(t(f"hada_t{i}"), t(f"hada_w{i}_a"), t(f"hada_w{i}_b")) if t(f"hada_t{i}") is not None
                 else t(f"hada_w{i}_a") @ t(f"hada_w{i}_b") for i in (1, 2)]
        updown, dim = sides[0] * sides[1], t("hada_w1_b").shape[0]
    else:
        dim = None
        if t("lokr_w1") is not None:
            w1 = t("lokr_w1")
        else:
            w1, dim = t("lokr_w1_a") @ t("lokr_w1_b"), t("lokr_w1_b").shape[0]
        if t("lokr_w2") is not None:
            w2 = t("lokr_w2")
        elif t("lokr_t2") is not None:
            w2, dim = cp(t("lokr_t2"), t("lokr_w2_a"), t("lokr_w2_b")), t("lokr_w2_b").shape[0]
        else:
            w2, dim = t("lokr_w2_a") @ t("lokr_w2_b"), t("lokr_w2_b").shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2.contiguous())  # A1111 makes w2 contiguous too (torch.kron needs it)
    scale = float(t("alpha")) / dim if t("alpha") is not None and dim is not None else 1.0
    return updown.reshape(shape) * scale


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(32, 64)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv1 = nn.Conv2d(64, 32, 1)


TARGETS = [Target("linear", "lora_unet_linear", False), Target("conv3", "lora_unet_conv3", True),
           Target("conv1", "lora_unet_conv1", False)]
INPUTS = {"linear": torch.randn(3, 32, generator=torch.Generator().manual_seed(1)),
          "conv3": torch.randn(2, 32, 5, 5, generator=torch.Generator().manual_seed(2)),
          "conv1": torch.randn(2, 64, 5, 5, generator=torch.Generator().manual_seed(3))}


def randomise(params):
    """peft starts one factor at zero (a no-op network); random values make every formula term count."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in params:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def applied_change(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the trained layer adds to the frozen layer's output."""
    with torch.no_grad():
        return layer(x) - layer.get_base_layer()(x)


def formula_change(base: nn.Module, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, delta, padding=base.padding)
    return F.linear(x, delta)


def assert_file_applies_the_training(model: nn.Module, file: dict[str, torch.Tensor], kind) -> None:
    assert kind_of_weights(file) is kind
    assert sorted(kind.module_names(file)) == sorted(t.kohya_name for t in TARGETS)
    for target in TARGETS:
        layer = model.get_submodule(target.path)
        base = layer.get_base_layer()
        expected = a1111_delta(file, target.kohya_name, base.weight.shape)
        assert torch.allclose(kind.delta(file, target.kohya_name).reshape(base.weight.shape), expected,
                              rtol=1e-5, atol=1e-6), target.path
        change = applied_change(layer, INPUTS[target.path])
        assert change.abs().max() > 1e-3  # the network really does something here
        assert torch.allclose(change, formula_change(base, expected, INPUTS[target.path]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, spec, shapes", [
    (LOHA, NetworkSpec(4, 2, conv_rank=2, conv_alpha=1),
     {"linear.hada_w1_a": (64, 4), "linear.hada_w2_b": (4, 32), "conv3.hada_w1_b": (2, 288)}),
    # factor 4: w1 [4, 4], w2 low-rank (the usual LoKr)
    (LOKR, NetworkSpec(4, 2, conv_rank=2, conv_alpha=1, factor=4),
     {"linear.lokr_w1": (4, 4), "linear.lokr_w2_a": (16, 4), "linear.lokr_w2_b": (4, 8),
      "conv3.lokr_w2_b": (2, 72)}),
    # a rank that reaches half of w2's larger side: no low-rank factor, where peft's alpha/rank and A1111's
    # scale 1 would differ — the kind makes training follow A1111
    (LOKR, NetworkSpec(64, 2, conv_rank=64, conv_alpha=1),
     {"linear.lokr_w1": (8, 4), "linear.lokr_w2": (8, 8), "conv3.lokr_w2": (8, 8, 3, 3),
      "conv1.lokr_w2": (8, 8, 1, 1)}),
])
def test_file_delta_is_the_a1111_formula_and_what_was_trained(kind, spec, shapes):
    torch.manual_seed(0)
    model = Layers()
    kind.inject(model, TARGETS, spec)
    randomise(kind.parameters(model))
    file = kind.state_dict(model, TARGETS, torch.float32)
    for key, shape in shapes.items():
        assert tuple(file[f"lora_unet_{key}"].shape) == shape, key
    assert_file_applies_the_training(model, file, kind)


@pytest.mark.parametrize("config_class, layer_class, kind", [(LoHaConfig, LoHaLayer, LOHA),
                                                            (LoKrConfig, LoKrLayer, LOKR)])
def test_cp_tucker_files_from_lycoris_apply_too(config_class, layer_class, kind):
    """LyCORIS's use_tucker files hold hada_t1/hada_t2 or lokr_t2 cores; merge must read them as A1111 does."""
    torch.manual_seed(0)
    model = Layers()
    # rank 2: every LoKr w2 stays low-rank (bare peft scales full-matrix layers unlike A1111; see above)
    inject_lycoris(config_class, model, TARGETS, NetworkSpec(2, 1, conv_rank=2, conv_alpha=1),
                   use_effective_conv2d=True)
    randomise([p for n, p in model.named_parameters() if "hada_" in n or "lokr_" in n])
    file = lycoris_state_dict(model, layer_class, TARGETS, torch.float32)
    assert any(key.endswith(("hada_t1", "lokr_t2")) for key in file)
    assert_file_applies_the_training(model, file, kind)


def test_dora_files_are_refused_rather_than_merged_wrongly():
    torch.manual_seed(0)
    model = Layers()
    LOHA.inject(model, TARGETS, NetworkSpec(4, 2, conv_rank=2))
    file = LOHA.state_dict(model, TARGETS, torch.float32)
    file["lora_unet_linear.dora_scale"] = torch.ones(1, 32)
    with pytest.raises(ValueError, match="lora_unet_linear uses DoRA"):
        LOHA.delta(file, "lora_unet_linear")


@pytest.fixture(scope="module")
def base():
    return build_builtin("tiny-sd15")


def unet_inputs(parts):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500]),
            torch.randn(1, 77, parts.text_encoder.config.hidden_size, generator=generator))


@pytest.mark.parametrize("kind, spec", [(LOHA, NetworkSpec(4, 2, conv_rank=2, conv_alpha=1)),
                                        (LOKR, NetworkSpec(4, 2, conv_rank=2, conv_alpha=1, factor=4))])
def test_kohya_names_and_merge_reproduces_the_trained_model(base, kind, spec):
    trained = copy.deepcopy(base)
    parts = network_targets(trained, {"unet", "text_encoder"}, with_conv=True)
    file = {}
    for _, model, targets in parts:
        kind.inject(model, targets, spec)
        randomise(kind.parameters(model))
        file.update(kind.state_dict(model, targets, torch.float16))
    marker = "hada_w1_a" if kind is LOHA else "lokr_w1"
    # the names A1111 and ComfyUI look up: kohya LoRA module names, text encoder with `text_model_`
    assert f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{marker}" in file
    assert f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{marker}" in file
    assert f"lora_te_text_model_encoder_layers_1_mlp_fc2.{marker}" in file
    assert f"lora_unet_down_blocks_0_resnets_0_conv1.{marker}" in file
    assert all(v.dtype == torch.float16 for v in file.values())
    assert len(kind.module_names(file)) == sum(len(targets) for _, _, targets in parts)

    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    merged = copy.deepcopy(base)
    assert merge_network(merged, file) == []
    full = {k: v.float() for k, v in file.items()}
    # the fp16 file is what users get; compare the merge with the trained network rounded the same way
    for _, model, targets in parts:
        kind.load_state_dict(model, targets, full)
    with torch.no_grad():
        te_trained, te_merged = trained.text_encoder(ids).last_hidden_state, merged.text_encoder(ids).last_hidden_state
        unet_trained, unet_merged = trained.unet(*unet_inputs(base)).sample, merged.unet(*unet_inputs(base)).sample
        unet_base = base.unet(*unet_inputs(base)).sample
    assert torch.allclose(te_merged, te_trained, atol=1e-3)
    assert torch.allclose(unet_merged, unet_trained, atol=1e-3)
    assert not torch.allclose(unet_base, unet_trained, atol=1e-2)


@pytest.mark.parametrize("kind", [LOHA, LOKR])
def test_loading_a_file_round_trips_and_names_a_shape_mismatch(base, kind):
    source = copy.deepcopy(base)
    (_, model, targets), = network_targets(source, {"unet"}, with_conv=False)
    kind.inject(model, targets, NetworkSpec(4, 2, factor=4 if kind is LOKR else -1))
    randomise(kind.parameters(model))
    file = kind.state_dict(model, targets, torch.float32)
    copy_of = copy.deepcopy(base)
    (_, target_model, _), = network_targets(copy_of, {"unet"}, with_conv=False)
    kind.inject(target_model, targets, NetworkSpec(4, 2, factor=4 if kind is LOKR else -1))
    assert kind.load_state_dict(target_model, targets, file) == len(targets)
    again = kind.state_dict(target_model, targets, torch.float32)
    assert all(torch.equal(again[k], file[k]) for k in file)
    other = copy.deepcopy(base)
    (_, other_model, _), = network_targets(other, {"unet"}, with_conv=False)
    kind.inject(other_model, targets, NetworkSpec(2, 2, factor=4 if kind is LOKR else -1))
    with pytest.raises(ValueError, match=r"lora_unet_\w+: the file has .* set network.rank / conv_rank / factor"):
        kind.load_state_dict(other_model, targets, file)


def test_factor_problem_names_the_layer_and_the_divisors():
    layers = Layers()
    modules = [(t.kohya_name, layers.get_submodule(t.path)) for t in TARGETS]
    assert factor_problem(-1, modules) is None and factor_problem(8, modules) is None
    problem = factor_problem(3, modules)
    assert problem == ("network.factor = 3 does not divide the 64 outputs of lora_unet_linear (LoKr splits every "
                       "adapted layer's sizes by the factor); use -1 (balanced split) or one of 1, 2, 4, 8, 16, 32")


def test_metadata_is_what_sd_scripts_writes_for_lycoris():
    import json

    meta = LOKR.metadata(NetworkSpec(8, 4, conv_rank=0, conv_alpha=1, factor=8))
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "conv_dim": "0", "conv_alpha": "1", "factor": "8"}
    assert json.loads(LOHA.metadata(NetworkSpec(8, 4, 4, 2))["ss_network_args"]) == {
        "algo": "loha", "conv_dim": "4", "conv_alpha": "2"}


@pytest.mark.parametrize("kind", [LOHA, LOKR])
def test_merge_lora_tool_merges_lycoris_files_by_the_formula(base, kind, tmp_path, capsys):
    import sys
    from pathlib import Path

    from library.models.loading import load_model
    from library.networks.targets import module_map
    from library.training.checkpoints import atomic_save_safetensors

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import merge_lora

    trained = copy.deepcopy(base)
    file = {}
    for _, model, targets in network_targets(trained, {"unet", "text_encoder"}, with_conv=True):
        kind.inject(model, targets, NetworkSpec(4, 2, conv_rank=2, conv_alpha=1))
        randomise(kind.parameters(model))
        file.update(kind.state_dict(model, targets, torch.float32))
    atomic_save_safetensors(file, tmp_path / "net.safetensors")
    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(["builtin:tiny-sd15", str(out), "--lora", f"{tmp_path / 'net.safetensors'}:0.7",
                            "--precision", "fp32"]) == 0
    assert f"{kind.name} modules" in capsys.readouterr().out
    before, after = module_map(base), module_map(load_model(str(out)))
    names = kind.module_names(file)
    assert any("resnets_0_conv1" in n for n in names) and any(n.startswith("lora_te_") for n in names)
    for name in names:
        expected = 0.7 * a1111_delta(file, name, before[name].weight.shape)
        assert torch.allclose(after[name].weight - before[name].weight, expected, atol=1e-5), name
