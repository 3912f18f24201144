"""Previews, compare.py and merge_lora.py on the tiny SDXL model: previews are conditioned as training is,
compare.py applies SDXL LoRAs and two-encoder embeddings per cell, and merged models save as SDXL checkpoints."""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import compare
from library.models.builtin import build_builtin
from library.models.loading import load_model
from library.networks import lora
from library.networks.base import NetworkSpec
from library.networks.embeddings import Embedding, save_embedding
from library.networks.targets import text_encoder_targets, unet_targets
from library.sampling.preview import SampleSpec, generate

REPO = Path(__file__).resolve().parents[2]


def sdxl_lora(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA on the UNet (original block names) and TE2 with random up weights."""
    parts = build_builtin("tiny-sdxl")
    weights = {}
    generator = torch.Generator().manual_seed(2)
    for model, targets in ((parts.unet, unet_targets(parts, with_conv=False)),
                           (parts.text_encoders[1], text_encoder_targets(parts, 1))):
        lora.add_lora(model, targets, NetworkSpec(rank=2, alpha=2))
        state = lora.kohya_state_dict(model, targets, torch.float32)
        weights.update({k: torch.randn(v.shape, generator=generator) * 0.5 if "lora_up" in k else v
                        for k, v in state.items()})
    save_file(weights, str(path))
    return weights


def test_preview_is_conditioned_like_training_and_leaves_state_alone():
    parts = build_builtin("tiny-sdxl")
    spec = SampleSpec("a kiln pot", "", 64, 64, 2, 5.0, 3, "euler")
    torch.manual_seed(0)
    expected_draw = torch.rand(2)
    torch.manual_seed(0)
    image = generate(parts, spec)
    assert torch.equal(torch.rand(2), expected_draw)
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    assert np.array_equal(np.asarray(generate(parts, spec)), np.asarray(image))  # seeded
    other = generate(parts, SampleSpec("a blue jug on a table", "", 64, 64, 2, 5.0, 3, "euler"))
    assert not np.array_equal(np.asarray(other), np.asarray(image))  # the prompt reaches the UNet


def test_compare_applies_sdxl_loras_and_embeddings_per_cell(tmp_path):
    sdxl_lora(tmp_path / "net.safetensors")
    generator = torch.Generator().manual_seed(4)
    save_embedding(Embedding.of_encoders("kilnpot", {"clip_l": torch.randn(2, 32, generator=generator),
                                                     "clip_g": torch.randn(2, 64, generator=generator)}),
                   tmp_path / "kilnpot.safetensors")
    out = tmp_path / "cmp"
    assert compare.main(["--model", "builtin:tiny-sdxl", "--prompt", "a photo of kilnpot", "--width", "64",
                         "--height", "64", "--steps", "2",
                         "--x", "lora", f"none,{(tmp_path / 'net.safetensors').as_posix()}",
                         "--y", "embedding", f"none,{(tmp_path / 'kilnpot.safetensors').as_posix()}",
                         "--output", str(out)]) == 0
    image = {p.stem: np.asarray(Image.open(p)) for p in (out / "cells").glob("*.png")}
    assert len(image) == 4
    assert not np.array_equal(image["x00-y00-z00"], image["x01-y00-z00"])  # the LoRA changes the image
    assert not np.array_equal(image["x00-y00-z00"], image["x00-y01-z00"])  # so does the embedding
    assert "kilnpot kilnpot_1" in Image.open(out / "cells" / "x00-y01-z00.png").text["parameters"]


def test_merge_tool_writes_an_sdxl_checkpoint(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import merge_lora

    weights = sdxl_lora(tmp_path / "net.safetensors")
    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(["builtin:tiny-sdxl", str(out), "--lora", f"{tmp_path / 'net.safetensors'}:0.5",
                            "--precision", "fp32"]) == 0
    merged, base = load_model(str(out)), build_builtin("tiny-sdxl")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    kohya = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    delta = lora.lora_delta(weights[f"{kohya}.lora_down.weight"], weights[f"{kohya}.lora_up.weight"], 2.0) * 0.5
    assert torch.allclose(merged.unet.get_submodule(name).weight, base.unet.get_submodule(name).weight + delta,
                          atol=1e-6)
    assert not torch.equal(merged.text_encoders[1].text_model.encoder.layers[0].mlp.fc1.weight,
                           base.text_encoders[1].text_model.encoder.layers[0].mlp.fc1.weight)
