"""LoRA networks: kohya names and shapes, merge math, and that diffusers loads our files and applies them exactly."""
import copy

import pytest
import torch

from library.networks import lora
from library.networks.base import NetworkSpec
from library.networks.merge import merge_network
from library.networks.targets import text_encoder_targets, unet_targets
from library.training.checkpoints import atomic_save_safetensors
from library.models.builtin import build_builtin


@pytest.fixture(scope="module")
def base():
    return build_builtin("tiny-sd15")


def randomise_up(model):
    """peft initialises lora_B to zero (a no-op network); give it weights so effects are visible."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def unet_inputs(parts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    width = parts.text_encoder.config.hidden_size
    conditioning = torch.randn(1, 77, width, generator=generator)
    return latents, torch.tensor([500]), conditioning


def test_kohya_names_and_shapes(base):
    parts = copy.deepcopy(base)
    spec = NetworkSpec(rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    unet_t = unet_targets(parts, with_conv=True)
    te_t = text_encoder_targets(parts)
    lora.add_lora(parts.unet, unet_t, spec)
    lora.add_lora(parts.text_encoder, te_t, spec)
    weights = {**lora.kohya_state_dict(parts.unet, unet_t, torch.float16),
               **lora.kohya_state_dict(parts.text_encoder, te_t, torch.float16)}
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert weights[f"{q}.lora_down.weight"].shape[0] == 4
    assert weights[f"{q}.lora_up.weight"].shape[1] == 4
    assert float(weights[f"{q}.alpha"]) == 2.0
    # the text-encoder names keep `text_model_` although transformers 5 dropped that module level
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert f"{te}.lora_down.weight" in weights
    for proj in ("k_proj", "v_proj", "out_proj"):
        assert f"lora_te_text_model_encoder_layers_0_self_attn_{proj}.alpha" in weights
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in weights
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert weights[f"{conv}.lora_down.weight"].shape[0] == 2  # its own rank
    assert weights[f"{conv}.lora_down.weight"].shape[2:] == (3, 3)
    assert float(weights[f"{conv}.alpha"]) == 1.0
    assert all(v.dtype == torch.float16 for v in weights.values())
    no_conv = unet_targets(base, with_conv=False)
    assert not any("resnets" in t.kohya_name for t in no_conv)


def test_merge_equals_injected_network(base):
    injected = copy.deepcopy(base)
    spec = NetworkSpec(rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    targets = unet_targets(injected, with_conv=True)
    lora.add_lora(injected.unet, targets, spec)
    randomise_up(injected.unet)
    weights = lora.kohya_state_dict(injected.unet, targets, torch.float32)
    inputs = unet_inputs(base)
    with torch.no_grad():
        expected = injected.unet(*inputs).sample
        merged = copy.deepcopy(base)
        assert merge_network(merged, weights, 1.0) == []
        got = merged.unet(*inputs).sample
        plain = base.unet(*inputs).sample
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the network really changes the output


def test_load_kohya_into_round_trips_and_checks_rank(base):
    source = copy.deepcopy(base)
    targets = unet_targets(source, with_conv=False)
    lora.add_lora(source.unet, targets, NetworkSpec(4, 4))
    randomise_up(source.unet)
    weights = lora.kohya_state_dict(source.unet, targets, torch.float32)
    target = copy.deepcopy(base)
    lora.add_lora(target.unet, targets, NetworkSpec(4, 4))
    assert lora.load_kohya_into(target.unet, targets, weights) == len(targets)
    assert torch.equal(lora.kohya_state_dict(target.unet, targets, torch.float32)[
        f"{targets[0].kohya_name}.lora_up.weight"], weights[f"{targets[0].kohya_name}.lora_up.weight"])
    wrong = copy.deepcopy(base)
    lora.add_lora(wrong.unet, targets, NetworkSpec(8, 4))
    with pytest.raises(ValueError, match="rank 4.*rank 8"):
        lora.load_kohya_into(wrong.unet, targets, weights)


@pytest.mark.parametrize("conv_rank", [0, 2])
def test_diffusers_load_lora_weights_applies_our_file_exactly(base, tmp_path, conv_rank):
    """The file is what diffusers/A1111/ComfyUI read: diffusers must apply it with the same effect as our merge."""
    trained = copy.deepcopy(base)
    spec = NetworkSpec(rank=4, alpha=2, conv_rank=conv_rank, conv_alpha=1)
    unet_t = unet_targets(trained, with_conv=conv_rank > 0)
    te_t = text_encoder_targets(trained)
    lora.add_lora(trained.unet, unet_t, spec)
    lora.add_lora(trained.text_encoder, te_t, spec)
    randomise_up(trained.unet)
    randomise_up(trained.text_encoder)
    weights = {**lora.kohya_state_dict(trained.unet, unet_t, torch.float32),
               **lora.kohya_state_dict(trained.text_encoder, te_t, torch.float32)}
    path = tmp_path / "net.safetensors"
    atomic_save_safetensors(weights, path, {"ss_network_dim": "4"})

    merged = copy.deepcopy(base)
    assert merge_network(merged, weights) == []
    pipe = copy.deepcopy(base).pipeline()
    pipe.load_lora_weights(str(path))
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    inputs = unet_inputs(base)
    with torch.no_grad():
        te_diffusers = pipe.text_encoder(ids).last_hidden_state
        te_ours = merged.text_encoder(ids).last_hidden_state
        te_base = base.text_encoder(ids).last_hidden_state
        unet_diffusers = pipe.unet(*inputs).sample
        unet_ours = merged.unet(*inputs).sample
        unet_base = base.unet(*inputs).sample
    assert not torch.allclose(te_base, te_ours, atol=1e-3)
    assert torch.allclose(te_diffusers, te_ours, atol=1e-4)
    assert not torch.allclose(unet_base, unet_ours, atol=1e-3)
    assert torch.allclose(unet_diffusers, unet_ours, atol=1e-4)


def test_merge_multiplier_scales_delta(base):
    source = copy.deepcopy(base)
    targets = unet_targets(source, with_conv=False)
    lora.add_lora(source.unet, targets, NetworkSpec(4, 4))
    randomise_up(source.unet)
    weights = lora.kohya_state_dict(source.unet, targets, torch.float32)
    half, full = copy.deepcopy(base), copy.deepcopy(base)
    merge_network(half, weights, 0.5)
    merge_network(full, weights, 1.0)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0, wh, wf = (m.unet.get_submodule(name).weight for m in (base, half, full))
    assert torch.allclose(wh - w0, (wf - w0) * 0.5, atol=1e-6)
    assert merge_network(half, {"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1),
                                "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1)}) == ["lora_unet_nowhere"]
