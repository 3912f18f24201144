"""sd-scripts' block-wise LoRA (block lr weights, block dims/alphas), rank and module dropout and max-norm
regularisation, on the real SD1 block mapping and the tiny model."""
import math

import pytest
import torch

from library.models.builtin import build_builtin
from library.models.families import family_named
from library.networks.base import NetworkSpec
from library.networks.blocks import BlockSettings, block_lr_weights, parse_weights, preset_weights
from library.networks.kinds import kind_named
from library.networks.lora import ADAPTER
from library.networks.trainable import NetworkTrainable

SD1 = family_named("sd1")


def test_the_sd1_unet_maps_to_sd_scripts_25_blocks():
    names = SD1.unet_block_names()
    assert len(names) == 25 and names[0] == "IN00" and names[12] == "MID" and names[24] == "OUT11"
    cases = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "IN01",
             "down_blocks.0.resnets.1.conv1": "IN02", "down_blocks.0.downsamplers.0.conv": "IN03",
             "down_blocks.2.attentions.1.proj_in": "IN08", "down_blocks.3.resnets.1.conv2": "IN11",
             "mid_block.attentions.0.proj_out": "MID", "up_blocks.0.resnets.0.conv1": "OUT00",
             "up_blocks.0.upsamplers.0.conv": "OUT02", "up_blocks.1.resnets.2.time_emb_proj": "OUT05",
             "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": "OUT11"}
    for path, name in cases.items():
        assert names[SD1.unet_block_index(path)] == name, path
    assert SD1.unet_block_index("conv_in") is None and SD1.unet_block_index("time_embedding.linear_1") is None


def test_lr_weight_presets_and_lists_as_sd_scripts():
    sine = preset_weights("sine", 12)
    assert sine[0] == 0.0 and sine[-1] == pytest.approx(1.0) and sine[6] == pytest.approx(math.sin(math.pi * 6 / 22))
    assert preset_weights("cosine", 12) == list(reversed(sine))
    assert preset_weights("linear+0.5", 12)[0] == 0.5 and preset_weights("zeros", 3) == [0.0] * 3
    assert parse_weights("1,0.5,,2", 6) == [1.0, 0.5, 0.0, 2.0, 1.0, 1.0]  # empty fields 0, padded with 1
    assert parse_weights([1.0] * 14, 12) == [1.0] * 12
    with pytest.raises(ValueError, match="preset"):
        parse_weights("sinus", 12)
    weights = block_lr_weights(SD1.unet_block_layout, "zeros+0.1", "0.5", None, zero_threshold=0.2)
    assert weights[:12] == [0.0] * 12 and weights[12] == 0.5 and weights[13:] == [1.0] * 12


def network(blocks=None, spec=None, max_norm=0.0, **kinds):
    parts = build_builtin("tiny-sd15")
    spec = spec or NetworkSpec(4, 2.0, conv_rank=2, conv_alpha=1.0)
    return parts, NetworkTrainable(parts, kind_named("lora"), spec, {"unet": 1e-3, "text_encoder": 5e-4}, 0,
                                   torch.float32, {}, blocks, max_norm)


def test_block_weights_make_named_groups_and_zero_blocks_get_no_modules():
    weights = [1.0] * 25
    weights[1] = 0.0  # IN01: the first down block's attention and resnet
    weights[16] = 0.5  # OUT03
    parts, trainable = network(BlockSettings(lr_weights=tuple(weights)))
    tensors = trainable.file_tensors(torch.float32)
    assert not any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in tensors)
    assert not any(k.startswith("lora_unet_down_blocks_0_resnets_0") for k in tensors)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in tensors)
    groups = {g["name"]: g for g in trainable.param_groups()}
    assert "unet_IN01" not in groups and groups["unet_OUT03"]["lr"] == pytest.approx(5e-4)
    assert groups["unet_MID"]["lr"] == pytest.approx(1e-3) and groups["text_encoder"]["lr"] == 5e-4
    every = [p for g in trainable.param_groups() for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(trainable.kind.parameters(parts.unet)) + \
        len(trainable.kind.parameters(parts.text_encoders[0]))


def test_block_dims_and_alphas_set_each_blocks_rank():
    dims = [4] * 25
    dims[4], dims[12] = 8, 0  # IN04 rank 8; no modules in MID
    alphas = [2.0] * 25
    alphas[4] = 16.0
    conv = [2] * 25
    conv[16] = 3
    _, trainable = network(BlockSettings(dims=tuple(dims), alphas=tuple(alphas), conv_dims=tuple(conv)))
    tensors = trainable.file_tensors(torch.float32)
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.lora_down.weight"].shape[0] == 8 and tensors[f"{q}.alpha"].item() == 16.0
    assert not any(k.startswith("lora_unet_mid_block_attentions") for k in tensors)  # MID rank 0
    assert tensors["lora_unet_mid_block_resnets_0_conv1.lora_down.weight"].shape[0] == 2  # its 3x3 convs: conv dims
    assert tensors["lora_unet_up_blocks_1_resnets_0_conv1.lora_down.weight"].shape[0] == 3
    assert tensors["lora_unet_up_blocks_1_resnets_1_conv1.lora_down.weight"].shape[0] == 2
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{te}.lora_down.weight"].shape[0] == 4  # text encoders keep network.rank


def test_rank_and_module_dropout_act_in_training_only():
    parts, trainable = network(spec=NetworkSpec(4, 4.0, rank_dropout=0.5, module_dropout=0.5))
    layer = dict(parts.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    with torch.no_grad():
        layer.lora_B[ADAPTER].weight.normal_()
    x = torch.randn(2, 5, layer.in_features)
    base = layer.base_layer(x)
    trainable.set_train(False)
    full = layer(x)
    assert not torch.allclose(full, base) and torch.equal(layer(x), full)  # eval: deterministic, no dropout
    trainable.set_train(True)
    torch.manual_seed(0)
    outputs = [layer(x) for _ in range(40)]
    skipped = sum(torch.allclose(out, base) for out in outputs)
    assert 8 < skipped < 32  # module dropout skips the whole branch about half the time
    kept = [out - base for out in outputs if not torch.allclose(out, base)]
    down = layer.lora_A[ADAPTER](x)
    full_delta = full - base
    # rank dropout: some ranks dropped per sample (and the rest scaled 2×), so the delta differs from eval's
    assert all(not torch.allclose(delta, full_delta) for delta in kept)
    assert down.shape[-1] == 4


def test_scale_weight_norms_caps_every_modules_norm():
    _, trainable = network(max_norm=0.01)
    for part in trainable.parts:
        for param in trainable.kind.parameters(part.model):
            with torch.no_grad():
                param.normal_(std=0.5)
    scalars = trainable.after_optimizer_step()
    assert scalars["max_norm/keys_scaled"] > 0
    assert scalars["max_norm/max_key_norm"] == pytest.approx(0.01, rel=1e-4)
    again = trainable.after_optimizer_step()
    assert again["max_norm/max_key_norm"] <= 0.01 * (1 + 1e-4)  # all within the cap now
    from library.networks.lora import lora_delta
    tensors = trainable.file_tensors(torch.float32)
    name = "lora_unet_mid_block_attentions_0_proj_in"
    delta = lora_delta(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                       float(tensors[f"{name}.alpha"]))
    assert delta.norm().item() <= 0.01 * (1 + 1e-4)
