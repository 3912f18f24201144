"""A1111 hypernetworks: the layer layout A1111 builds (key indices), the .pt file (weights-only, A1111's keys), the
UNet output matching an independent few-line implementation of the documented semantics, strength and train
mode, the attention backend, and files made for another family."""
import inspect
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from library.models.builtin import build_builtin
from library.models.header import header_of, read_model_header
from library.models.paths import CONFIG_ROOT
from library.networks.compat import hypernetwork_problem
from library.networks.hypernetwork import (Hypernetwork, HypernetworkFileError, HypernetworkModule,
                                           activation_classes, attach, load_hypernetwork, save_hypernetwork,
                                           unet_widths)
from library.networks.hypernetwork_spec import ACTIVATIONS, HypernetworkSpec, a1111_dropout_structure

STRING_KEYS = {"step": int, "name": str, "layer_structure": list, "activation_func": str, "is_layer_norm": bool,
               "weight_initialization": str, "sd_checkpoint": type(None), "sd_checkpoint_name": type(None),
               "activate_output": bool, "use_dropout": bool, "dropout_structure": list, "last_layer_dropout": bool,
               "optional_info": type(None)}


def keys_of(spec: HypernetworkSpec) -> list[str]:
    return sorted({key.rsplit(".", 1)[0] for key in HypernetworkModule(8, spec).state_dict()})


def test_activation_names_are_a1111s_on_this_torch():
    table = activation_classes()
    unusable = {"glu", "multiheadattention", "threshold"}  # A1111 lists them, but they cannot build a working MLP
    assert set(ACTIVATIONS) == set(table) - unusable
    assert table["swish"] is torch.nn.Hardswish and table["linear"] is torch.nn.Identity
    assert {name.lower() for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
            if cls.__module__ == "torch.nn.modules.activation"} - unusable <= set(ACTIVATIONS)


@pytest.mark.parametrize("spec, keys, kinds", [
    (HypernetworkSpec(), ["linear.0", "linear.1"], ["Linear", "Linear"]),
    (HypernetworkSpec(activation_func="relu"), ["linear.0", "linear.2"], ["Linear", "ReLU", "Linear"]),
    (HypernetworkSpec(activation_func="relu", is_layer_norm=True), ["linear.0", "linear.2", "linear.3", "linear.4"],
     ["Linear", "ReLU", "LayerNorm", "Linear", "LayerNorm"]),
    (HypernetworkSpec(is_layer_norm=True), ["linear.0", "linear.1", "linear.2", "linear.3"],
     ["Linear", "LayerNorm", "Linear", "LayerNorm"]),
    (HypernetworkSpec(activation_func="relu", use_dropout=True, dropout_structure=(0, 0.3, 0)),
     ["linear.0", "linear.3"], ["Linear", "ReLU", "Dropout", "Linear"]),
    (HypernetworkSpec((1, 2, 2, 1), "swish", use_dropout=True, dropout_structure=(0, 0.3, 0.3, 0)),
     ["linear.0", "linear.3", "linear.6"], ["Linear", "Hardswish", "Dropout", "Linear", "Hardswish", "Dropout",
                                            "Linear"]),
    (HypernetworkSpec(activation_func="relu", activate_output=True), ["linear.0", "linear.2"],
     ["Linear", "ReLU", "Linear", "ReLU"]),
])
def test_layer_indices_are_a1111s(spec, keys, kinds):
    module = HypernetworkModule(8, spec)
    assert [type(layer).__name__ for layer in module.linear] == kinds
    assert keys_of(spec) == keys
    assert spec.parameter_count(8) == 2 * sum(p.numel() for p in module.parameters())
    assert [layer.p for layer in module.linear if isinstance(layer, torch.nn.Dropout)] == \
        [p for p in spec.dropout_structure if p]


def test_a1111_dropout_structure():
    assert a1111_dropout_structure([1, 2, 1], False, False) == [0, 0, 0]
    assert a1111_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]  # A1111: [1, 2, 1] gets none without it
    assert a1111_dropout_structure([1, 2, 1], True, True) == [0, 0.3, 0]
    assert a1111_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]


def random_network(parts, spec: HypernetworkSpec, seed: int = 0) -> Hypernetwork:
    spec = HypernetworkSpec(spec.layer_structure, spec.activation_func, "XavierNormal", spec.is_layer_norm,
                            spec.use_dropout, spec.dropout_structure, spec.activate_output)
    network = Hypernetwork(spec, unet_widths(parts), "hn").initialise(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # LayerNorm weights start near 0 (A1111's init): give them a visible effect
        for param in network.parameters():
            if param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.5)
    return network


def test_file_is_a1111s_layout_and_loads_weights_only(tmp_path):
    parts = build_builtin("tiny-sd15")
    spec = HypernetworkSpec(activation_func="relu", is_layer_norm=True)
    network = random_network(parts, spec)
    network.step = 12
    save_hypernetwork(network, tmp_path / "hn.pt")
    data = torch.load(tmp_path / "hn.pt", weights_only=True)  # as ComfyUI loads it: no code in the pickle
    assert [key for key in data if isinstance(key, int)] == [32, 64]  # the tiny model's text and attention widths
    assert {key: type(data[key]) for key in STRING_KEYS} == STRING_KEYS
    assert data["layer_structure"] == [1.0, 2.0, 1.0] and data["activation_func"] == "relu"
    assert data["is_layer_norm"] is True and data["step"] == 12 and data["last_layer_dropout"] is False
    key_mlp, value_mlp = data[32]
    assert isinstance(data[32], tuple) and isinstance(key_mlp, OrderedDict)
    assert list(key_mlp) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
                             "linear.3.weight", "linear.3.bias", "linear.4.weight", "linear.4.bias"]
    assert key_mlp["linear.0.weight"].shape == (64, 32) and value_mlp["linear.3.weight"].shape == (32, 64)
    loaded = load_hypernetwork(tmp_path / "hn.pt")
    assert loaded.spec == network.spec and loaded.step == 12 and loaded.name == "hn"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), network.state_dict().values()))


def test_old_and_partial_files_load_with_a1111_defaults(tmp_path):
    torch.save({768: ({"linear1.weight": torch.ones(1536, 768), "linear1.bias": torch.zeros(1536),
                       "linear2.weight": torch.ones(768, 1536), "linear2.bias": torch.zeros(768)},) * 2},
               tmp_path / "old.pt")
    old = load_hypernetwork(tmp_path / "old.pt")  # linear1/linear2 renamed; no string keys: A1111's defaults
    assert old.widths == [768] and old.spec.layer_structure == (1.0, 2.0, 1.0) and old.spec.activate_output is True
    assert torch.equal(old.pair(768)[0].linear[1].weight, torch.ones(768, 1536))
    torch.save({"name": "x"}, tmp_path / "none.pt")
    with pytest.raises(HypernetworkFileError, match="no per-width modules"):
        load_hypernetwork(tmp_path / "none.pt")
    torch.save({768: ({}, {}), "activation_func": "gelu2"}, tmp_path / "bad.pt")
    with pytest.raises(HypernetworkFileError, match="not an activation A1111 knows"):
        load_hypernetwork(tmp_path / "bad.pt")


def reference_mlp(state: dict, activation: str, x: torch.Tensor) -> torch.Tensor:
    """The documented semantics, written independently: the file's `linear.<i>` entries in index order, a
    2-D weight a Linear, a 1-D one a LayerNorm; an index with no entry is the activation."""
    indices = sorted({int(key.split(".")[1]) for key in state})
    out = x
    for i in range(indices[-1] + 1):
        if i not in indices:
            out = {"relu": F.relu, "linear": lambda t: t}[activation](out)
        elif state[f"linear.{i}.weight"].dim() == 2:
            out = F.linear(out, state[f"linear.{i}.weight"], state[f"linear.{i}.bias"])
        else:
            out = F.layer_norm(out, out.shape[-1:], state[f"linear.{i}.weight"], state[f"linear.{i}.bias"])
    return out


class ReferenceAttention:
    """An attention processor applying a file by REFERENCE.md: k = to_k(c + mlp_k(c)·s), v likewise, q untouched."""

    def __init__(self, data: dict, strength: float):
        self.data, self.strength = data, strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k_in = v_in = context
        if context.shape[-1] in self.data:
            k_state, v_state = self.data[context.shape[-1]]
            activation = self.data["activation_func"]
            k_in = context + reference_mlp(k_state, activation, context) * self.strength
            v_in = context + reference_mlp(v_state, activation, context) * self.strength
        q, k, v = attn.to_q(hidden_states), attn.to_k(k_in), attn.to_v(v_in)
        batch, heads = q.shape[0], attn.heads
        q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, attn.inner_dim)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("spec", [HypernetworkSpec(), HypernetworkSpec(activation_func="relu", is_layer_norm=True)],
                         ids=["a1111-default", "relu-layernorm"])
def test_unet_output_matches_an_independent_implementation(tmp_path, spec):
    parts = build_builtin("tiny-sd15")
    save_hypernetwork(random_network(parts, spec), tmp_path / "hn.pt")
    generator = torch.Generator().manual_seed(3)
    latents, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        base = parts.unet(latents, timesteps, context).sample
        attached = attach(parts, load_hypernetwork(tmp_path / "hn.pt"), strength=0.7)
        kiln = parts.unet(latents, timesteps, context).sample
        attached.remove()
        assert torch.equal(parts.unet(latents, timesteps, context).sample, base)  # removed: the base again
        reference = build_builtin("tiny-sd15")
        reference.unet.set_attn_processor(ReferenceAttention(torch.load(tmp_path / "hn.pt", weights_only=True), 0.7))
        expected = reference.unet(latents, timesteps, context).sample
    assert (kiln - base).abs().max() > 1e-3  # the network changes the output...
    torch.testing.assert_close(kiln, expected, atol=2e-5, rtol=1e-4)  # ...exactly as documented


def test_strength_applies_in_eval_mode_and_training_uses_one():
    module = HypernetworkModule(8, HypernetworkSpec())
    with torch.no_grad():
        for param in module.parameters():
            param.zero_()
        module.linear[1].bias.fill_(1.0)  # linear(x) = 1 everywhere
    x = torch.zeros(1, 8)
    module.multiplier = 0.25
    assert torch.allclose(module.eval()(x), torch.full((1, 8), 0.25))
    assert torch.allclose(module.train()(x), torch.ones(1, 8))  # A1111 trains at strength 1


def test_hooks_work_whichever_attention_processor_runs():
    parts = build_builtin("tiny-sd15")
    network = random_network(parts, HypernetworkSpec())
    attach(parts, network, 1.0)
    generator = torch.Generator().manual_seed(5)
    latents, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        sdpa = parts.unet(latents, 500, context).sample
        parts.unet.set_attn_processor(AttnProcessor())  # what choosing another backend does to the UNet
        classic = parts.unet(latents, 500, context).sample
        plain = build_builtin("tiny-sd15").unet(latents, 500, context).sample
    torch.testing.assert_close(classic, sdpa, atol=1e-5, rtol=1e-4)
    assert (classic - plain).abs().max() > 1e-3


def test_a_file_for_another_family_is_refused():
    sd1, sd2 = (read_model_header(str(CONFIG_ROOT / name)) for name in ("sd1", "sd2"))  # the full-size configs
    assert (sd1.context_dim, sd1.attention_widths) == (768, (320, 640, 1280))
    a1111_sd1 = [768, 320, 640, 1280]
    assert hypernetwork_problem("hn.pt", a1111_sd1, sd1) is None
    assert "made for another model family" in hypernetwork_problem("hn.pt", a1111_sd1, sd2)
    assert hypernetwork_problem("hn.pt", [768, 1024, 320, 640, 1280], sd2) is None  # A1111 offers both widths
    tiny = build_builtin("tiny-sd15")
    assert header_of(tiny).attention_widths == read_model_header("builtin:tiny-sd15").attention_widths == (32, 64)
