"""Model families: which family a model is (from diffusers configs or single-file keys), and what each family
decides — kohya names, metadata strings, tokenizer padding, native size."""
import json

import pytest

from library.models.families import family_for_configs, family_for_ldm_keys, family_named
from library.models.paths import CONFIG_ROOT


def configs(folder: str):
    read = lambda sub: json.loads((CONFIG_ROOT / folder / sub / "config.json").read_text())  # noqa: E731
    return read("unet"), read("text_encoder")


@pytest.mark.parametrize("folder, family", [("sd1", "sd1"), ("sd2", "sd2"), ("tiny-sd15", "sd1"), ("tiny-sd2", "sd2")])
def test_family_from_configs(folder, family):
    assert family_for_configs(*configs(folder)).name == family


def test_a_unet_with_extra_conditioning_is_no_sd_family():
    unet, text = configs("sd1")
    assert family_for_configs({**unet, "addition_embed_type": "text_time", "cross_attention_dim": 2048}, text).name \
        == "sdxl"
    assert family_for_configs({**unet, "addition_embed_type": "image", "cross_attention_dim": 2048}, text) is None


def test_family_from_single_file_keys():
    assert family_for_ldm_keys(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]).name == "sd1"
    assert family_for_ldm_keys(["cond_stage_model.model.ln_final.weight"]).name == "sd2"
    assert family_for_ldm_keys(["conditioner.embedders.0.transformer.text_model.x"]) is None


def test_kohya_names_are_built_explicitly():
    sd1 = family_named("sd1")
    slot = sd1.text_encoders[0]
    name = sd1.unet_kohya_namer({})
    assert name("down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    for path in ("encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"):
        assert sd1.text_encoder_kohya_name(slot, path) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_metadata_strings_and_sizes_as_other_tools_expect():
    sd1, sd2 = family_named("sd1"), family_named("sd2")
    assert sd1.base_model_version(False) == ("sd_v1", "stable-diffusion-v1")
    assert sd2.base_model_version(True) == ("sd_v2_v", "stable-diffusion-v2-768-v")
    assert sd2.metadata(False) == {"ss_base_model_version": "sd_v2", "ss_v2": "True"}
    assert (sd1.native_resolution(False), sd2.native_resolution(True)) == (512, 768)
    assert sd2.build_tokenizers()[0].pad_token == "!" and sd1.build_tokenizers()[0].pad_token == "<|endoftext|>"
