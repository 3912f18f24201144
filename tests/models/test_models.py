"""Model layer: built-in tiny models, offline tokenizer, diffusers-folder and single-file round trips."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.models import ldm_layout as layout
from library.models.clip_tokenizer import build_clip_tokenizer
from library.models.families import family_for_ldm_keys, family_named
from library.models.paths import BUILTIN_MODELS, CONFIG_ROOT, ModelLoadError, model_path_problem
from library.models.builtin import build_builtin
from library.models.loading import load_model
from library.models.diffusers_folder import save_diffusers
from library.models.single_file import save_single_file

REPO = Path(__file__).resolve().parents[2]
FAMILY = {"tiny-sd15": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
SD_BUILTINS = ("tiny-sd15", "tiny-sd2")  # SDXL's own layout is tested in test_sdxl_models.py


def _state(parts) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's state dict, of ModelParts or a diffusers pipeline."""
    encoders = getattr(parts, "text_encoders", None) or [
        m for m in (parts.text_encoder, getattr(parts, "text_encoder_2", None)) if m is not None]
    names = ["unet", "vae"] + [f"text_encoder {i}" for i in range(len(encoders))]
    return dict(zip(names, (m.state_dict() for m in (parts.unet, parts.vae, *encoders))))


def assert_same_weights(a, b) -> None:
    """Bitwise-equal weights for every component, same key sets."""
    states = _state(b)
    for name, expected in _state(a).items():
        actual = states[name]
        assert set(actual) == set(expected), f"{name}: key sets differ"
        different = [k for k in expected if not torch.equal(expected[k], actual[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:2]}"


@pytest.fixture(scope="module", params=SD_BUILTINS)
def saved(request, tmp_path_factory):
    """A built-in model saved once as a diffusers folder and as an fp32 single file."""
    name = request.param
    parts = build_builtin(name)
    root = tmp_path_factory.mktemp(name)
    save_diffusers(parts, root / "folder")
    save_single_file(parts, root / "model.safetensors", dtype=torch.float32)
    return name, parts, root


# ---------------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_builtin_is_deterministic_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_builtin(name)
    assert torch.equal(torch.rand(3), expected_draw)
    assert_same_weights(first, build_builtin("builtin:" + name))
    assert first.family.name == FAMILY[name]
    assert first.v_prediction == (name == "tiny-sd2")
    assert first.noise_scheduler.config.prediction_type == ("v_prediction" if first.v_prediction else "epsilon")
    assert first.text_encoder.get_input_embeddings().weight.shape[0] == 49408
    assert first.vae.config.scaling_factor == (0.13025 if name == "tiny-sdxl" else 0.18215)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_builtin_pipeline_makes_an_image_offline(name):
    parts = build_builtin(name)
    for size in (64, 128):
        images = parts.pipeline()("a photo of a cat", num_inference_steps=2, height=size, width=size,
                                  output_type="np").images
        assert images.shape == (1, size, size, 3)
        assert torch.isfinite(torch.from_numpy(images)).all()


def test_load_model_casts_to_requested_dtype_and_prints_one_line(capsys):
    parts = load_model("builtin:tiny-sd15", dtypes=torch.bfloat16)
    assert {p.dtype for m in (parts.unet, parts.vae, parts.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert "builtin:tiny-sd15" in lines[0] and "epsilon" in lines[0] and "v_parameterization" in lines[0]


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_openai_clip_ids():
    sd1 = build_clip_tokenizer()
    assert sd1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert sd1.model_max_length == 77 and len(sd1) == 49408
    padded = sd1("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_sd2_tokenizer_pads_with_exclamation_mark():
    sd2 = family_named("sd2").build_tokenizers()[0]
    ids = sd2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [0] * 70


# ---------------------------------------------------------------------------------------------- round trips


def test_diffusers_folder_round_trip(saved, capsys):
    name, parts, root = saved
    loaded = load_model(str(root / "folder"))
    assert_same_weights(parts, loaded)
    assert (loaded.family.name, loaded.v_prediction) == (FAMILY[name], name == "tiny-sd2")
    assert "scheduler_config.json" in capsys.readouterr().out
    prompt = "a photo of a cat, masterpiece"
    assert loaded.tokenizer(prompt, padding="max_length").input_ids == parts.tokenizer(prompt, padding="max_length").input_ids
    # Readers on transformers 4 need the prefixed text-encoder names and the vocab/merges files.
    with safe_open(str(root / "folder" / "text_encoder" / "model.safetensors"), "pt") as handle:
        assert all(k.startswith("text_model.") for k in handle.keys())
    assert (root / "folder" / "tokenizer" / "vocab.json").is_file()
    assert (root / "folder" / "tokenizer" / "merges.txt").read_text().startswith("#version")


def test_save_diffusers_replaces_existing_folder(tmp_path):
    save_diffusers(build_builtin("tiny-sd2"), tmp_path / "out")
    save_diffusers(build_builtin("tiny-sd15"), tmp_path / "out")
    assert load_model(str(tmp_path / "out")).family.name == "sd1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup folders left


def test_folder_with_only_fp16_variant_weights_loads(tmp_path):
    parts = build_builtin("tiny-sd15")
    save_diffusers(parts, tmp_path / "m")
    for weights in (tmp_path / "m").glob("*/*.safetensors"):  # as `hf download --variant fp16` leaves them
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    assert_same_weights(parts, load_model(str(tmp_path / "m")))


def test_single_file_round_trip_with_our_loader(saved):
    name, parts, root = saved
    loaded = load_model(str(root / "model.safetensors"))
    assert_same_weights(parts, loaded)
    assert (loaded.family.name, loaded.v_prediction) == (FAMILY[name], name == "tiny-sd2")


def test_single_file_uses_original_sd_layout(saved):
    name, parts, root = saved
    with safe_open(str(root / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
        attn_q = handle.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()
        text_keys = {k for k in keys if k.startswith("cond_stage_model.")}
        if FAMILY[name] == "sd2":
            fused = handle.get_slice("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight").get_shape()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert len(attn_q) == 4 and attn_q[2:] == [1, 1]  # 1x1 conv, as the original VAE stores it
    assert metadata["kiln.prediction_type"] == ("v_prediction" if name == "tiny-sd2" else "epsilon")
    if FAMILY[name] == "sd1":
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in text_keys
        assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in text_keys
    else:
        width = parts.text_encoder.config.hidden_size
        assert fused == [3 * width, width]
        assert "cond_stage_model.model.ln_final.weight" in text_keys
        assert not any("q_proj" in k for k in text_keys)


def test_single_file_loads_in_diffusers_from_single_file(saved):
    _, parts, root = saved
    pipe = StableDiffusionPipeline.from_single_file(
        str(root / "model.safetensors"), config=str(root / "folder"), local_files_only=True, safety_checker=None
    )
    assert_same_weights(parts, pipe)


def test_half_precision_single_file_is_default_and_loads_close(tmp_path):
    parts = build_builtin("tiny-sd15")
    save_single_file(parts, tmp_path / "half.safetensors")
    with safe_open(str(tmp_path / "half.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    loaded = load_model(str(tmp_path / "half.safetensors"))
    weight = loaded.unet.conv_out.weight
    assert weight.dtype == torch.float32
    assert torch.allclose(weight, parts.unet.conv_out.weight, atol=1e-3)


def test_tensor_only_ckpt_loads_with_config_dir(tmp_path, saved):
    name, parts, root = saved
    tensors = load_file(str(root / "model.safetensors"))
    torch.save({"state_dict": tensors, "global_step": 7}, tmp_path / "model.ckpt")
    loaded = load_model(str(tmp_path / "model.ckpt"), config_dir=str(CONFIG_ROOT / name))
    assert_same_weights(parts, loaded)


# ---------------------------------------------------------------------------------------------- v-prediction


def _strip_metadata(source: Path, target: Path) -> None:
    save_file(load_file(str(source)), str(target), metadata={"format": "pt"})


def test_v_prediction_from_folder_scheduler_config(tmp_path):
    save_diffusers(build_builtin("tiny-sd15"), tmp_path / "m")
    config_path = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    parts = load_model(str(tmp_path / "m"))
    assert parts.v_prediction and parts.noise_scheduler.config.prediction_type == "v_prediction"
    assert parts.pipeline().scheduler.config.prediction_type == "v_prediction"


def test_v_prediction_from_yaml_beside_file_and_explicit_override(tmp_path, capsys):
    save_single_file(build_builtin("tiny-sd2"), tmp_path / "orig.safetensors", dtype=torch.float32)
    plain = tmp_path / "plain.safetensors"
    _strip_metadata(tmp_path / "orig.safetensors", plain)
    config_dir = str(CONFIG_ROOT / "tiny-sd2")

    assumed = load_model(str(plain), config_dir=config_dir)
    assert not assumed.v_prediction
    assert "model.v_parameterization = true" in capsys.readouterr().out

    plain.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    from_yaml = load_model(str(plain), config_dir=config_dir)
    assert from_yaml.v_prediction and from_yaml.noise_scheduler.config.prediction_type == "v_prediction"
    assert "plain.yaml" in capsys.readouterr().out

    forced = load_model(str(plain), v_parameterization=False, config_dir=config_dir)
    assert not forced.v_prediction and forced.noise_scheduler.config.prediction_type == "epsilon"


def test_file_without_metadata_or_known_width_asks_for_config_dir(tmp_path, saved):
    _, _, root = saved
    _strip_metadata(root / "model.safetensors", tmp_path / "tiny.safetensors")
    with pytest.raises(ModelLoadError, match="config_dir"):
        load_model(str(tmp_path / "tiny.safetensors"))


# ---------------------------------------------------------------------------------------------- refusals


class _Opaque:
    """Any class outside torch's weights-only allow list: loading it would run arbitrary code."""


def test_pickled_ckpt_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "callbacks": _Opaque()}, path)
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert str(path) in message and ".safetensors" in message and "pickle" in message


def test_lora_file_is_named_as_such(tmp_path):
    path = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path))
    with pytest.raises(ModelLoadError, match="is a LoRA"):
        load_model(str(path))


def test_model_path_problem_messages(tmp_path):
    assert model_path_problem("builtin:tiny-sd15") is None
    assert "builtin:tiny-sd15" in model_path_problem("builtin:tiny-sd3")

    missing = tmp_path / "nope.safetensors"
    assert str(missing) in model_path_problem(str(missing)) and "not found" in model_path_problem(str(missing))

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    message = model_path_problem(str(tmp_path / "empty"))
    assert "model_index.json" in message and "model.safetensors" in message

    message = model_path_problem("no-such-org-kiln/no-such-model")
    assert "offline" in message and "hf download no-such-org-kiln/no-such-model" in message

    (tmp_path / "notes.txt").write_text("x")
    assert ".txt" in model_path_problem(str(tmp_path / "notes.txt"))
    assert model_path_problem(str(missing.with_name("ok.safetensors"))) is not None
    assert "empty" in model_path_problem("")


def test_unmappable_weight_is_an_error_not_dropped():
    config = json.loads((CONFIG_ROOT / "tiny-sd15" / "unet" / "config.json").read_text())
    with pytest.raises(layout.LayoutError, match="extra_head.weight"):
        layout.unet_to_ldm({"conv_in.weight": torch.zeros(1), "extra_head.weight": torch.zeros(1)}, config)


# ---------------------------------------------------------------------------------------------- full-size layout

_SHARED_KEYS = {
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.4.0.emb_layers.1.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.middle_block.2.out_layers.3.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.8.2.conv.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.mid.attn_1.proj_out.weight",
    "first_stage_model.encoder.norm_out.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.up.1.block.2.conv2.weight",
    "first_stage_model.decoder.mid.block_2.norm1.weight",
    "first_stage_model.quant_conv.weight",
    "first_stage_model.post_quant_conv.weight",
}
ORIGINAL_KEYS = {
    "sd1": _SHARED_KEYS | {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    },
    "sd2": _SHARED_KEYS | {
        "cond_stage_model.model.token_embedding.weight",
        "cond_stage_model.model.positional_embedding",
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias",
        "cond_stage_model.model.ln_final.weight",
    },
}



@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_layout_reads_back_through_diffusers(family):
    """The real SD1.5/SD2 architectures (on the meta device, no weights) map to the original key names
    that diffusers' own reader turns back into exactly the same tensors."""
    folder = CONFIG_ROOT / family
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    text_config = CLIPTextConfig.from_dict(json.loads((folder / "text_encoder" / "config.json").read_text()))
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config).state_dict()
        vae = AutoencoderKL.from_config(vae_config).state_dict()
        text_model = CLIPTextModel(text_config)
    text = text_model.state_dict()
    ldm = layout.diffusers_to_ldm(unet, unet_config, vae, vae_config, family_named(family).ldm_text_state_dict([text]))
    assert len([k for k in ldm if k.startswith(layout.UNET_PREFIX)]) == 686  # as in v1-5-pruned-emaonly
    assert len([k for k in ldm if k.startswith(layout.VAE_PREFIX)]) == 248
    # Names from the original checkpoints; diffusers' reader tolerates some variants A1111 would not.
    assert ORIGINAL_KEYS[family] <= set(ldm)
    assert not ({"first_stage_model.encoder.down.3.downsample.conv.weight",
                 "first_stage_model.decoder.up.0.upsample.conv.weight",
                 "model.diffusion_model.output_blocks.5.1.conv.weight"} & set(ldm))
    assert layout.ldm_context_dim({k: v.shape for k, v in ldm.items()}) == {"sd1": 768, "sd2": 1024}[family]
    assert family_for_ldm_keys(list(ldm)).name == family

    unet_back = convert_ldm_unet_checkpoint(ldm, unet_config)
    vae_back = convert_ldm_vae_checkpoint(ldm, vae_config)
    if family == "sd1":
        text_back = convert_ldm_clip_checkpoint(ldm)
    else:
        text_back = convert_open_clip_checkpoint(text_model, ldm)
    text_back = {k.removeprefix("text_model."): v for k, v in text_back.items() if not k.endswith("position_ids")}
    for original, back in ((unet, unet_back), (vae, vae_back), (text, text_back)):
        assert set(back) == set(original)
        assert all(back[k].shape == original[k].shape for k in original)


# ---------------------------------------------------------------------------------------------- convert tool


def _convert_tool():
    spec = importlib.util.spec_from_file_location("convert_model", REPO / "tools" / "convert_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_model_cli_both_directions(tmp_path):
    single = tmp_path / "tiny.safetensors"
    folder = tmp_path / "tiny_diffusers"
    for src, dst in (("builtin:tiny-sd15", single), (str(single), folder)):
        result = subprocess.run(
            [sys.executable, "tools/convert_model.py", src, str(dst), "--precision", "fp32"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"Wrote {dst}" in result.stdout
    builtin = build_builtin("tiny-sd15")
    assert_same_weights(builtin, load_model(str(folder)))
    # Folder → single file again (in-process: the subprocess path is proven above), recording v-prediction.
    again = tmp_path / "again.safetensors"
    assert _convert_tool().main([str(folder), str(again), "--precision", "fp32", "--v-parameterization", "true"]) == 0
    reloaded = load_model(str(again))
    assert_same_weights(builtin, reloaded)
    assert reloaded.v_prediction


def test_convert_model_refuses_to_overwrite(tmp_path, capsys):
    module = _convert_tool()
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    assert module.main(["builtin:tiny-sd15", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
