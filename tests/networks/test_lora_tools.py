"""tools/extract_lora.py and tools/merge_lora.py on the built-in tiny model: merging adds exactly the weighted
LoRA deltas, extraction recovers them, and a LoRA extracted from a DreamBooth run reproduces that run."""
import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_dreambooth
from library.networks import lora
from library.networks.targets import module_map, text_encoder_targets, unet_targets
from library.training.checkpoints import atomic_save_safetensors
from library.models.conditioning import encode_text, tokenize
from library.models.builtin import build_builtin
from library.models.loading import load_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import extract_lora  # noqa: E402
import merge_lora  # noqa: E402


@pytest.fixture(scope="module")
def base():
    return build_builtin("tiny-sd15")


def random_lora(parts, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA on every UNet target (3x3 convs included) and every text-encoder target."""
    generator = torch.Generator().manual_seed(seed)
    targets = [(parts.unet, t) for t in unet_targets(parts, with_conv=True)]
    targets += [(parts.text_encoder, t) for t in text_encoder_targets(parts)]
    out = {}
    for model, target in targets:
        weight = model.get_submodule(target.path).weight
        tail = tuple(weight.shape[2:])
        down_shape = (rank, weight.shape[1], *tail)
        up_shape = (weight.shape[0], rank, 1, 1) if tail else (weight.shape[0], rank)
        out[f"{target.kohya_name}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * 0.1
        out[f"{target.kohya_name}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.1
        out[f"{target.kohya_name}.alpha"] = torch.tensor(float(rank) / 2)
    return out


def deltas(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = sorted(k.removesuffix(".lora_down.weight") for k in weights if k.endswith(".lora_down.weight"))
    return {n: lora.lora_delta(weights[f"{n}.lora_down.weight"], weights[f"{n}.lora_up.weight"],
                               float(weights[f"{n}.alpha"])) for n in names}


def test_merge_adds_weighted_deltas_and_extract_recovers_them(base, tmp_path):
    a, b = random_lora(base, 2, seed=1), random_lora(base, 3, seed=2)
    atomic_save_safetensors(a, tmp_path / "a.safetensors")
    atomic_save_safetensors(b, tmp_path / "b.safetensors")
    merged_path = tmp_path / "merged.safetensors"
    assert merge_lora.main(["builtin:tiny-sd15", str(merged_path), "--lora", f"{tmp_path / 'a.safetensors'}:0.8",
                            "--lora", f"{tmp_path / 'b.safetensors'}:-0.5", "--precision", "fp32"]) == 0
    merged = load_model(str(merged_path))
    expected = {n: 0.8 * d for n, d in deltas(a).items()}
    for name, delta in deltas(b).items():
        expected[name] = expected[name] - 0.5 * delta
    base_modules, merged_modules = module_map(base), module_map(merged)
    for name, delta in expected.items():
        before, after = base_modules[name].weight, merged_modules[name].weight
        assert torch.allclose(after - before, delta.reshape(before.shape), atol=1e-5), name

    # the merged change has rank 2 + 3 per module: extracting at rank 5 recovers it
    extracted_path = tmp_path / "extracted.safetensors"
    assert extract_lora.main([str(merged_path), "builtin:tiny-sd15", str(extracted_path), "--rank", "5",
                              "--conv-rank", "5", "--precision", "fp32"]) == 0
    extracted = load_file(str(extracted_path))
    assert set(deltas(extracted)) == set(expected)  # every module, 3x3 convs and text encoder included
    for name, delta in deltas(extracted).items():
        error = (delta - expected[name]).norm() / expected[name].norm()
        assert error < 1e-3, (name, error.item())
        assert float(extracted[f"{name}.alpha"]) == extracted[f"{name}.lora_down.weight"].shape[0]  # scale 1
    with safe_open(str(extracted_path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "5" and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert extracted["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)


def unet_outputs(parts, captions: list[str]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(len(captions), 4, 8, 8, generator=generator)
    with torch.no_grad():
        conditioning = encode_text(parts.text_encoder, tokenize(parts.tokenizer, captions))
        return torch.cat([parts.unet(latents, torch.full((len(captions),), t), conditioning).sample
                          for t in (100, 500, 900)])


def test_lora_extracted_from_dreambooth_reproduces_the_fine_tune(base, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(REPO / "examples" / "sample_dataset" / "train", data)
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
path = "builtin:tiny-sd15"
[dataset]
train_dir = "{data.as_posix()}"
resolution = 64
[optimizer]
lr = 1e-3
[train]
max_steps = 6
batch_size = 2
[save]
output_dir = "{(tmp_path / 'out').as_posix()}"
name = "tuned"
precision = "fp32"
[logging]
log_dir = "{(tmp_path / 'logs').as_posix()}"
""", encoding="utf-8")
    assert train_dreambooth.main([str(config)]) == 0
    tuned_path = tmp_path / "out" / "tuned.safetensors"
    out = tmp_path / "extracted.safetensors"
    # a full fine-tune moves the ResNet convolutions too: LoCon (--conv-rank) is needed to follow it
    assert extract_lora.main([str(tuned_path), "builtin:tiny-sd15", str(out), "--rank", "8", "--conv-rank", "8"]) == 0
    weights = load_file(str(out))
    assert all(w.dtype == torch.float16 for w in weights.values())
    assert not any(k.startswith("lora_te") for k in weights)  # the text encoder was not trained: left out

    tuned = load_model(str(tuned_path))
    with_lora = copy.deepcopy(base)
    merge_lora.merge_files(with_lora, [(out, 1.0)])
    captions = ["kiln pot", "a photo of a pot on a table"]
    target = unet_outputs(tuned, captions)
    base_error = (unet_outputs(base, captions) - target).norm()
    lora_error = (unet_outputs(with_lora, captions) - target).norm()
    # biases, norms and conv_in/out have no LoRA form, so part of the change stays out of reach
    assert lora_error < 0.6 * base_error, (lora_error.item(), base_error.item())

    # diffusers reads the file as A1111/ComfyUI do and applies what our merge applies
    pipe = copy.deepcopy(base).pipeline()
    pipe.load_lora_weights(str(out))
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    conditioning = torch.randn(1, 77, base.text_encoder.config.hidden_size, generator=generator)
    with torch.no_grad():
        ours = with_lora.unet(latents, torch.tensor([500]), conditioning).sample
        theirs = pipe.unet(latents, torch.tensor([500]), conditioning).sample
    assert torch.allclose(ours, theirs, atol=1e-4)

    assert extract_lora.main(["builtin:tiny-sd15", "builtin:tiny-sd15", str(tmp_path / "none.safetensors"),
                              "--rank", "4"]) == 2  # identical models: nothing to extract


def test_lora_spec_parsing_keeps_windows_drive_letters():
    assert merge_lora.parse_lora_spec("a.safetensors:0.8") == (Path("a.safetensors"), 0.8)
    assert merge_lora.parse_lora_spec("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert merge_lora.parse_lora_spec(r"C:\loras\a.safetensors") == (Path(r"C:\loras\a.safetensors"), 1.0)
    assert merge_lora.parse_lora_spec(r"C:\loras\a.safetensors:-0.5") == (Path(r"C:\loras\a.safetensors"), -0.5)


def test_merge_refuses_foreign_files_and_existing_output(base, tmp_path, capsys):
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2)}
    atomic_save_safetensors(sdxl, tmp_path / "xl.safetensors")
    atomic_save_safetensors({"emb_params": torch.zeros(1, 32)}, tmp_path / "ti.safetensors")
    out = tmp_path / "out.safetensors"
    assert merge_lora.main(["builtin:tiny-sd15", str(out), "--lora", str(tmp_path / "xl.safetensors")]) == 2
    assert "match nothing in the base model" in capsys.readouterr().err
    assert merge_lora.main(["builtin:tiny-sd15", str(out), "--lora", str(tmp_path / "ti.safetensors")]) == 2
    assert "holds no LoRA, LoHa or LoKr modules" in capsys.readouterr().err
    assert not out.exists()
    out.write_bytes(b"earlier")
    assert merge_lora.main(["builtin:tiny-sd15", str(out), "--lora", str(tmp_path / "xl.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"earlier"
