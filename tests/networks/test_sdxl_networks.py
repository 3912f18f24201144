"""SDXL networks and embeddings as other tools read them: kohya SDXL LoRA names (original block names, lora_te1_ /
lora_te2_), diffusers' StableDiffusionXLPipeline applying our LoRA exactly as our merge does, and our clip_l/clip_g
embeddings loaded into that pipeline giving the same conditioning as Kiln's own encoding."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from library.models.builtin import build_builtin
from library.models.paths import CONFIG_ROOT
from library.networks import lora
from library.networks.base import NetworkSpec
from library.networks.embeddings import Embedding, EmbeddingError, add_tokens, load_embedding, save_embedding
from library.networks.merge import merge_network
from library.networks.targets import module_map, text_encoder_targets, unet_targets
from library.training.checkpoints import atomic_save_safetensors
from tests.networks.test_lora import randomise_up


@pytest.fixture(scope="module")
def base():
    return build_builtin("tiny-sdxl")


def unet_inputs(parts, seed=0):
    """Noisy latents, a timestep and SDXL's whole conditioning (hidden states, pooled text, size ids)."""
    generator = torch.Generator().manual_seed(seed)
    width = parts.unet.config.cross_attention_dim
    pooled = parts.text_encoders[1].config.projection_dim
    return (torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500]),
            torch.randn(1, 77, width, generator=generator),
            {"text_embeds": torch.randn(1, pooled, generator=generator),
             "time_ids": torch.tensor([[96.0, 80.0, 8.0, 0.0, 64.0, 64.0]])})


def run_unet(unet, inputs):
    latents, steps, hidden, added = inputs
    return unet(latents, steps, hidden, added_cond_kwargs=added).sample


# Module paths of the full-size SDXL UNet and the names sd-scripts gives them (its own SGM-named UNet).
FULL_SIZE_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    "down_blocks.2.attentions.1.proj_out": "lora_unet_input_blocks_8_1_proj_out",
    "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj":
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0":
        "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_out_0",
    "up_blocks.1.attentions.0.proj_in": "lora_unet_output_blocks_3_1_proj_in",
    "down_blocks.0.resnets.1.conv2": "lora_unet_input_blocks_2_0_out_layers_3",
    "down_blocks.1.resnets.0.conv1": "lora_unet_input_blocks_4_0_in_layers_2",
    "up_blocks.2.resnets.2.time_emb_proj": "lora_unet_output_blocks_8_0_emb_layers_1",
    "down_blocks.1.resnets.0.conv_shortcut": "lora_unet_input_blocks_4_0_skip_connection",
    "mid_block.resnets.1.conv1": "lora_unet_middle_block_2_in_layers_2",
    "down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_3_0_op",
    "down_blocks.1.downsamplers.0.conv": "lora_unet_input_blocks_6_0_op",
    "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
    "up_blocks.1.upsamplers.0.conv": "lora_unet_output_blocks_5_2_conv",
}


def test_kohya_sdxl_names_follow_the_original_blocks(base):
    config = json.loads((CONFIG_ROOT / "sdxl" / "unet" / "config.json").read_text())
    name = base.family.unet_kohya_namer(config)
    assert {path: name(path) for path in FULL_SIZE_NAMES} == FULL_SIZE_NAMES
    targets = unet_targets(base, with_conv=True)
    names = {t.kohya_name for t in targets}
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)  # never mixed
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_unet_output_blocks_2_2_conv",
            "lora_unet_input_blocks_3_0_op", "lora_unet_middle_block_2_in_layers_2"} <= names
    assert not any("label_emb" in n or "time_embed" in n or "input_blocks_0_0" in n for n in names)
    te1, te2 = text_encoder_targets(base, 0), text_encoder_targets(base, 1)
    assert te1[0].kohya_name.startswith("lora_te1_text_model_encoder_layers_0_")
    assert te2[0].kohya_name.startswith("lora_te2_text_model_encoder_layers_0_")
    assert not any("text_projection" in t.kohya_name for t in te2)
    assert len(te1) == len(te2) == 2 * 6  # q, k, v, out_proj, fc1, fc2 per layer
    assert set(module_map(base)) >= names | {t.kohya_name for t in te1 + te2}


@pytest.fixture(scope="module")
def trained_file(base, tmp_path_factory):
    """A LoCon (3x3 convs at their own rank) on the UNet and both text encoders, with random up weights."""
    trained = copy.deepcopy(base)
    spec = NetworkSpec(rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    parts = [(trained.unet, unet_targets(trained, with_conv=True))]
    parts += [(trained.text_encoders[i], text_encoder_targets(trained, i)) for i in range(2)]
    weights = {}
    for model, targets in parts:
        lora.add_lora(model, targets, spec)
        randomise_up(model)
        weights.update(lora.kohya_state_dict(model, targets, torch.float32))
    path = tmp_path_factory.mktemp("sdxl-lora") / "net.safetensors"
    atomic_save_safetensors(weights, path, {"ss_base_model_version": "sdxl_base_v1-0"})
    return path, weights


def test_diffusers_sdxl_load_lora_weights_applies_our_file_exactly(base, trained_file):
    path, weights = trained_file
    merged = copy.deepcopy(base)
    assert merge_network(merged, weights) == []
    pipe = copy.deepcopy(base).pipeline()
    pipe.load_lora_weights(str(path))
    te1_ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    te2_ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
    inputs = unet_inputs(base)
    with torch.no_grad():
        outputs = {
            "te1": [m(te1_ids).last_hidden_state for m in (pipe.text_encoder, merged.text_encoders[0],
                                                           base.text_encoders[0])],
            "te2": [m(te2_ids).text_embeds for m in (pipe.text_encoder_2, merged.text_encoders[1],
                                                     base.text_encoders[1])],
            "unet": [run_unet(m, inputs) for m in (pipe.unet, merged.unet, base.unet)],
        }
    for part, (theirs, ours, plain) in outputs.items():
        assert not torch.allclose(plain, ours, atol=1e-3), f"{part}: the LoRA changes nothing"
        assert torch.allclose(theirs, ours, atol=1e-4), f"{part}: diffusers applies it differently"


def test_merge_reports_sd1_files_as_unmatched(base):
    sd1 = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
           "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2),
           "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
           "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2)}
    assert sorted(merge_network(copy.deepcopy(base), sd1)) == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                                              "lora_unet_down_blocks_1_attentions_0_proj_in"]


# ---------------------------------------------------------------------------------------------- embeddings


def sdxl_embedding(vectors: int = 2) -> Embedding:
    generator = torch.Generator().manual_seed(5)
    halves = {"clip_l": torch.randn(vectors, 32, generator=generator) * 0.3,
              "clip_g": torch.randn(vectors, 64, generator=generator) * 0.3}
    return Embedding.of_encoders("kilnpot", halves, 40)


def test_sdxl_embedding_file_holds_both_halves_and_refuses_pt(tmp_path):
    embedding = sdxl_embedding()
    path = tmp_path / "kilnpot.safetensors"
    save_embedding(embedding, path, torch.float16)
    stored = load_file(str(path))
    assert sorted(stored) == ["clip_g", "clip_l"] and stored["clip_g"].shape == (2, 64)
    loaded = load_embedding(path)
    assert loaded.step == 40 and torch.equal(loaded.per_encoder["clip_g"], embedding.per_encoder["clip_g"].half().float())
    with pytest.raises(EmbeddingError, match="no form for SDXL"):
        save_embedding(embedding, tmp_path / "kilnpot.pt")
    assert not (tmp_path / "kilnpot.pt").exists()


def test_diffusers_sdxl_pipeline_loads_both_halves_and_conditions_as_kiln_does(tmp_path):
    embedding = sdxl_embedding()
    path = tmp_path / "kilnpot.safetensors"
    save_embedding(embedding, path)
    ours = build_builtin("tiny-sdxl")
    ids = [add_tokens(t, e, "kilnpot", 2) for t, e in zip(ours.tokenizers, ours.text_encoders)][0]
    for encoder, values in zip(ours.text_encoders, embedding.tensors_for(["clip_l", "clip_g"])):
        with torch.no_grad():
            encoder.get_input_embeddings().weight[ids] = values

    pipe = build_builtin("tiny-sdxl").pipeline()
    state = load_file(str(path))  # what diffusers' SDXL docs do with such a file
    pipe.load_textual_inversion(state["clip_l"], token="kilnpot", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="kilnpot", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    assert pipe.maybe_convert_prompt("a kilnpot vase", pipe.tokenizer) == "a kilnpot kilnpot_1 vase"
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a kilnpot vase", do_classifier_free_guidance=False)
        kiln = ours.family.encode_text(ours, ["a kilnpot kilnpot_1 vase"], 1)
        te2_ids = ours.tokenizers[1](["a kilnpot kilnpot_1 vase"], padding="max_length", return_tensors="pt").input_ids
        final = ours.text_encoders[1](te2_ids).last_hidden_state[0]
        at_largest_id = ours.text_encoders[1].text_projection(final[te2_ids[0].argmax()])
    assert torch.allclose(embeds, kiln.hidden_states, atol=1e-5)
    # pooled at the end token: the shipped TE2 config says eos_token_id 49407, so transformers agrees with Kiln
    # even though the TI tokens have the largest ids (the hub's legacy eos_token_id 2 pools at the largest id)
    assert torch.allclose(pooled, kiln.pooled, atol=1e-5)
    assert not torch.allclose(kiln.pooled[0], at_largest_id, atol=1e-3)
