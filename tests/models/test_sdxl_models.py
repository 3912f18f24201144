"""SDXL as a model family: detection from configs and weights, conditioning as SDXL was trained (both encoders'
penultimate states, TE2's pooled output at the end token, size ids), and the single-file layout other tools read
(our loader, diffusers' from_single_file and convert_model.py, bit-exact both ways)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.data.batches import SampleGeometry
from library.data.images import CropBox
from library.models import ldm_layout as layout
from library.models.builtin import build_builtin
from library.models.detect import family_of_path
from library.models.diffusers_folder import save_diffusers
from library.models.families import family_for_configs, family_for_ldm_keys, family_named
from library.models.loading import load_model
from library.models.paths import CONFIG_ROOT, ModelLoadError
from library.models.single_file import save_single_file
from tests.models.test_models import _convert_tool, assert_same_weights

REPO = Path(__file__).resolve().parents[2]
SDXL = family_named("sdxl")


def read_config(folder: str, sub: str) -> dict:
    name = "scheduler_config.json" if sub == "scheduler" else "config.json"
    return json.loads((CONFIG_ROOT / folder / sub / name).read_text())


@pytest.fixture(scope="module")
def tiny():
    return build_builtin("tiny-sdxl")


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    save_single_file(tiny, root / "model.safetensors", dtype=torch.float32)
    save_diffusers(tiny, root / "folder")
    return root


# ---------------------------------------------------------------------------------------------- the family


def test_family_is_told_from_configs_keys_and_paths(saved):
    for folder in ("sdxl", "tiny-sdxl"):
        assert family_for_configs(read_config(folder, "unet"), read_config(folder, "text_encoder")) is SDXL
    assert family_for_ldm_keys([layout.SDXL_CLIP_PREFIX + "final_layer_norm.weight",
                                layout.SDXL_OPENCLIP_PREFIX + "ln_final.weight"]) is SDXL
    refiner = ["conditioner.embedders.0.model.ln_final.weight"]  # OpenCLIP only: the refiner, not trained here
    assert family_for_ldm_keys(refiner) is None
    assert family_of_path("builtin:tiny-sdxl") is SDXL and family_of_path("builtin:tiny-sd15").name == "sd1"
    assert family_of_path(str(saved / "model.safetensors")) is SDXL
    assert family_of_path(str(saved / "folder")) is SDXL


def test_family_strings_and_tokenizers_as_other_tools_expect():
    assert SDXL.base_model_version(False) == ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base")
    assert SDXL.metadata(False) == {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    assert SDXL.native_resolution(False) == 1024
    first, second = SDXL.build_tokenizers()
    ids = [t("a cat", padding="max_length", max_length=77).input_ids for t in (first, second)]
    assert ids[0][:4] == ids[1][:4] == [49406, 320, 2368, 49407]
    assert ids[0][4:] == [49407] * 73 and ids[1][4:] == [0] * 73  # TE2 pads with "!"
    assert [slot.embedding_key for slot in SDXL.text_encoders] == ["clip_l", "clip_g"]


def test_encoding_is_both_penultimate_states_and_pooled_text_at_the_end_token(tiny):
    captions = ["a photo of a kiln pot", ""]  # "" is what caption dropout trains on: the empty-prompt conditioning
    with torch.no_grad():
        encoding = SDXL.encode_text(tiny, captions, 1)
        skipped = SDXL.encode_text(tiny, captions, 2)
        outputs = [e(t(captions, padding="max_length", return_tensors="pt").input_ids, output_hidden_states=True)
                   for t, e in zip(tiny.tokenizers, tiny.text_encoders)]
    assert encoding.hidden_states.shape == (2, 77, 32 + 64) and encoding.pooled.shape == (2, 48)
    expected = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)  # no final layer norm
    assert torch.equal(encoding.hidden_states, expected)
    assert torch.equal(skipped.hidden_states, torch.cat([out.hidden_states[-3] for out in outputs], dim=-1))
    assert torch.allclose(encoding.pooled, outputs[1].text_embeds, atol=1e-6)  # no added tokens: the same place
    assert torch.equal(skipped.pooled, encoding.pooled)  # clip_skip never changes the pooled output


def test_long_captions_are_read_in_75_token_windows_by_both_encoders(tiny):
    """train.max_token_length = 150 as sd-scripts does it for SDXL: both encoders read two windows, their states
    are stitched (start token, 150 tokens, end token) and the pooled output is the first window's."""
    long_caption = " ".join(["pot"] * 70 + ["glaze"] * 70)
    captions = [long_caption, "a short one"]
    with torch.no_grad():
        short = SDXL.encode_text(tiny, captions, 1)
        long = SDXL.encode_text(tiny, captions, 1, 150)
    assert long.hidden_states.shape == (2, 152, 32 + 64) and long.pooled.shape == (2, 48)
    assert torch.equal(long.hidden_states[:, :76], short.hidden_states[:, :76])  # the first window as before
    assert torch.allclose(long.pooled, short.pooled, atol=1e-6)  # the first window's pooled output
    assert not torch.allclose(long.hidden_states[0, 76:151], long.hidden_states[1, 76:151])  # "glaze" is read


def test_size_ids_come_from_each_samples_geometry(tiny):
    geometry = [SampleGeometry((1000, 1500), CropBox(64, 96, 0, 16), (64, 64)),
                SampleGeometry((1500, 1000), CropBox(96, 64, 8, 0), (64, 64), flip=True)]
    with torch.no_grad():
        conditioning = SDXL.conditioning(SDXL.encode_text(tiny, ["a", "b"], 1), SimpleNamespace(geometry=geometry))
    # (original h, w, crop top, left, target h, w); a mirrored crop's left is measured in the mirrored image
    assert conditioning.added["time_ids"].tolist() == [[1500, 1000, 16, 0, 64, 64], [1000, 1500, 0, 24, 64, 64]]
    kwargs = conditioning.unet_kwargs(torch.bfloat16)
    assert kwargs["added_cond_kwargs"]["time_ids"].dtype == torch.float32  # sizes stay exact in bf16
    assert kwargs["added_cond_kwargs"]["text_embeds"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="size and crop"):
        SDXL.conditioning(SDXL.encode_text(tiny, ["a"], 1), None)


def test_kiln_embeddings_equal_the_diffusers_pipelines_and_clip_skip_counts_as_documented(tiny):
    pipe = tiny.pipeline()
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a photo of a kiln pot", do_classifier_free_guidance=False)
        skipped, _, _, _ = pipe.encode_prompt("a photo of a kiln pot", do_classifier_free_guidance=False, clip_skip=1)
        ours = SDXL.encode_text(tiny, ["a photo of a kiln pot"], 1)
        ours_skipped = SDXL.encode_text(tiny, ["a photo of a kiln pot"], 2)
    assert torch.allclose(embeds, ours.hidden_states, atol=1e-6) and torch.allclose(pooled, ours.pooled, atol=1e-6)
    assert torch.allclose(skipped, ours_skipped.hidden_states, atol=1e-6)  # Kiln's clip_skip 2 = diffusers' 1


# ---------------------------------------------------------------------------------------------- single files


def test_single_file_has_the_original_sdxl_layout(saved, tiny):
    with safe_open(str(saved / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        projection = handle.get_tensor(layout.SDXL_OPENCLIP_PREFIX + "text_projection")
        fused = handle.get_slice(layout.SDXL_OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight").get_shape()
        metadata = handle.metadata()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert {f"model.diffusion_model.label_emb.0.{i}.weight" for i in (0, 2)} <= keys
    assert {"model.diffusion_model.output_blocks.2.2.conv.weight", "model.diffusion_model.input_blocks.3.0.op.weight",
            "model.diffusion_model.input_blocks.4.1.proj_in.weight"} <= keys
    assert layout.SDXL_CLIP_PREFIX + "encoder.layers.0.self_attn.q_proj.weight" in keys
    assert layout.SDXL_CLIP_PREFIX + "embeddings.position_ids" in keys
    assert fused == [3 * 64, 64] and not any(k.startswith(layout.SDXL_OPENCLIP_PREFIX) and "q_proj" in k for k in keys)
    # OpenCLIP stores x @ text_projection: the transpose of the Linear weight (64 wide in, 48 out)
    assert torch.equal(projection, tiny.text_encoders[1].text_projection.weight.T)
    assert metadata["kiln.family"] == "sdxl" and "kiln.config.text_encoder_2" in metadata


def test_single_file_loads_bit_exact_in_kiln_and_in_diffusers(saved, tiny, capsys):
    loaded = load_model(str(saved / "model.safetensors"))
    assert_same_weights(tiny, loaded)
    assert "SDXL single file, 2 text encoders" in capsys.readouterr().out
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(saved / "model.safetensors"), config=str(CONFIG_ROOT / "tiny-sdxl"), local_files_only=True,
        tokenizer=tiny.tokenizers[0], tokenizer_2=tiny.tokenizers[1])
    assert_same_weights(tiny, pipe)
    assert not [n for m in (pipe.unet, pipe.text_encoder_2) for n, p in m.named_parameters() if p.is_meta]


def test_file_from_another_tool_loads_with_a_config_dir(saved, tiny, tmp_path):
    plain = tmp_path / "other.safetensors"
    save_file(load_file(str(saved / "model.safetensors")), str(plain), metadata={"format": "pt"})  # no Kiln configs
    with pytest.raises(ModelLoadError, match="config_dir"):
        load_model(str(plain))  # not the released width, so no shipped config fits
    assert_same_weights(tiny, load_model(str(plain), config_dir=str(CONFIG_ROOT / "tiny-sdxl")))


def test_diffusers_folder_round_trip(saved, tiny):
    loaded = load_model(str(saved / "folder"))
    assert_same_weights(tiny, loaded)
    assert (saved / "folder" / "tokenizer_2" / "vocab.json").is_file()
    assert loaded.tokenizers[1].pad_token == "!"
    with safe_open(str(saved / "folder" / "text_encoder_2" / "model.safetensors"), "pt") as handle:
        assert all(k.startswith(("text_model.", "text_projection.")) for k in handle.keys())


def test_convert_model_round_trip_is_bit_exact(tmp_path):
    first, folder, again = tmp_path / "a.safetensors", tmp_path / "folder", tmp_path / "b.safetensors"
    convert = _convert_tool()  # the script's own main, in-process (test_models.py runs it as a subprocess)
    for args in (["builtin:tiny-sdxl", str(first)], [str(first), str(folder)], [str(folder), str(again)]):
        assert convert.main([*args, "--precision", "fp32"]) == 0
    a, b = load_file(str(first)), load_file(str(again))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_weights(build_builtin("tiny-sdxl"), load_model(str(folder)))


def test_full_size_sdxl_layout_reads_back_through_diffusers():
    """The released SDXL architecture (meta device, no weights): 2.6 B UNet parameters, original key names that
    diffusers' own readers turn back into the same tensors, and the shipped config chosen by its width."""
    unet_config, vae_config = read_config("sdxl", "unet"), read_config("sdxl", "vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config).state_dict()
        te1 = CLIPTextModel(CLIPTextConfig.from_dict(read_config("sdxl", "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(read_config("sdxl", "text_encoder_2")))
    assert 2.56e9 < sum(p.numel() for p in unet.parameters()) < 2.57e9
    assert unet_config["projection_class_embeddings_input_dim"] == 1280 + 6 * unet_config["addition_time_embed_dim"]
    unet = unet.state_dict()
    texts = [te1.state_dict(), te2.state_dict()]
    ldm = layout.diffusers_to_ldm(unet, unet_config, vae, vae_config, SDXL.ldm_text_state_dict(texts))
    assert layout.ldm_context_dim({k: v.shape for k, v in ldm.items()}) == 2048
    assert SDXL.config_folder(2048) == "sdxl" and family_for_ldm_keys(list(ldm)) is SDXL
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in ldm
    back = [(unet, convert_ldm_unet_checkpoint(ldm, unet_config)), (vae, convert_ldm_vae_checkpoint(ldm, vae_config)),
            (texts[0], convert_ldm_clip_checkpoint(ldm)),
            (texts[1], convert_open_clip_checkpoint(te2, ldm, prefix=layout.SDXL_OPENCLIP_PREFIX))]
    for original, converted in back:
        converted = {k.removeprefix("text_model.") if k.removeprefix("text_model.") in original else k: v
                     for k, v in converted.items() if not k.endswith("position_ids")}
        assert set(converted) == set(original)
        assert all(converted[k].shape == original[k].shape for k in original)


def test_sdxl_refiner_is_refused_by_name(tmp_path):
    path = tmp_path / "refiner.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4),
               "conditioner.embedders.0.model.ln_final.weight": torch.zeros(4)}, str(path))
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        load_model(str(path))


def test_dropped_captions_train_on_the_empty_prompts_encoding(tiny, tmp_path):
    from library.data.batches import TrainingData
    from library.data.captions import CaptionOptions
    from library.data.folders import ImageItem
    from library.data.sources import ConditioningSource

    items = [ImageItem(p, "kiln pot, vase", True, 1, False, 0) for p in sorted((REPO / "examples" /
                                                                                 "sample_dataset" / "train").rglob("*.png"))]
    data = TrainingData(items, CaptionOptions(dropout_rate=1.0), 64, 2, seed=1)
    batch = data.batch(0, data.epoch_batches(0)[0])
    assert batch.captions == ["", ""]
    with torch.no_grad():
        dropped = ConditioningSource(tiny).encode(batch.captions)
        empty = SDXL.encode_text(tiny, [""], 1)
    assert torch.allclose(dropped.hidden_states[0], empty.hidden_states[0], atol=1e-5)
    assert torch.allclose(dropped.pooled[0], empty.pooled[0], atol=1e-5)
    assert dropped.pooled.abs().sum() > 0  # encoded "", not zeros


def test_whole_model_saves_as_a_diffusers_folder_too(tiny, tmp_path):
    from library.models.saving import save_model

    save_model(tiny, tmp_path / "dreambooth", torch.float32)  # what save_format = "diffusers" writes
    assert_same_weights(tiny, load_model(str(tmp_path / "dreambooth")))
