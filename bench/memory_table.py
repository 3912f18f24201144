#!/usr/bin/env python
"""The memory table of docs/memory.md, computed from parameter counts (no GPU, no weights, nothing downloaded).

    python bench/memory_table.py [--sdxl-configs FOLDER]

Builds each architecture from its diffusers configs on PyTorch's meta device (shapes only) and adds up what a
run keeps on the training device besides activations: the frozen weights in the compute dtype (the VAE in
fp32, as Kiln keeps it), the trained weights, their gradients and the optimizer state in their dtype, and the
EMA copy. SD1.5 uses library/models/model_configs/sd1; SDXL the `sdxl` folder there when Kiln ships it, or
--sdxl-configs. Activations depend on resolution, attention kernel and checkpointing and are not computed
here: they need a measurement on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1024**3


def _configs(folder: Path) -> dict:
    index = json.loads((folder / "model_index.json").read_text())
    return {name: json.loads((folder / name / "config.json").read_text()) for name in index
            if not name.startswith("_") and (folder / name / "config.json").is_file()}


def meta_model(folder: Path):
    """(unet, [text encoders], vae) with meta tensors: shapes, no memory."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    configs = _configs(folder)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        encoders = []
        for name in ("text_encoder", "text_encoder_2"):
            if name in configs:
                cls = getattr(transformers, configs[name]["architectures"][0])
                encoders.append(cls(cls.config_class.from_dict(configs[name])))
    return unet, encoders, vae


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(unet, encoders, rank: int) -> int:
    """LoRA (Kiln's targets: UNet attention blocks, every text-encoder attention/MLP layer) at `rank`."""
    from library.networks.targets import TE_BLOCKS, UNET_ATTENTION_BLOCKS, find_targets

    total = 0
    for model, blocks in [(unet, UNET_ATTENTION_BLOCKS)] + [(e, TE_BLOCKS) for e in encoders]:
        modules = dict(model.named_modules())
        for target in find_targets(model, lambda path: path, blocks):
            layer = modules[target.path]
            fan_in = getattr(layer, "in_features", None) or layer.in_channels
            fan_out = getattr(layer, "out_features", None) or layer.out_channels
            total += rank * (fan_in + fan_out)
    return total


def adafactor_state(modules) -> int:
    """transformers' Adafactor without momentum: row and column second moments for matrices, full ones else."""
    total = 0
    for module in modules:
        for param in module.parameters():
            shape = tuple(param.shape)
            if len(shape) >= 2:  # exp_avg_sq_row: shape[:-1]; exp_avg_sq_col: shape[:-2] + shape[-1:]
                total += math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
            else:
                total += param.numel()
    return total


def row(label: str, frozen: float, trained: int, trained_bytes: int, grads: float, state: float, ema: float) -> str:
    total = frozen + trained * trained_bytes + grads + state + ema
    cells = [frozen, trained * trained_bytes, grads, state, ema, total]
    return f"| {label} | " + " | ".join(f"{value / GIB:.2f}" for value in cells) + " |"


def table(name: str, folder: Path) -> list[str]:
    unet, encoders, vae = meta_model(folder)
    n_unet, n_te, n_vae = count(unet), sum(count(e) for e in encoders), count(vae)
    lines = [f"### {name}: UNet {n_unet / 1e6:,.1f} M, text encoder(s) {n_te / 1e6:,.1f} M, VAE {n_vae / 1e6:,.1f} M "
             "parameters", "", "| setting | frozen weights | trained weights | gradients | optimizer state | EMA | "
             "total (GiB, without activations) |", "|---|---|---|---|---|---|---|"]
    vae_bytes = n_vae * 4  # Kiln keeps the VAE in fp32
    rank = 32
    lora = lora_params(unet, encoders, rank)
    frozen = (n_unet + n_te) * 2 + vae_bytes
    lines.append(row(f"LoRA rank {rank} ({lora / 1e6:.1f} M), AdamW, fp32 weights", frozen, lora, 4, lora * 4,
                     lora * 8, 0))
    lines.append(row(f"LoRA rank {rank}, AdamW, `full_bf16`", frozen, lora, 2, lora * 2, lora * 4, 0))
    full = n_unet
    frozen = n_te * 2 + vae_bytes
    factored = adafactor_state([unet]) * 4
    lines.append(row("DreamBooth UNet, AdamW, fp32 weights", frozen, full, 4, full * 4, full * 8, 0))
    lines.append(row("DreamBooth UNet, AdamW, fp32 weights, EMA on the device", frozen, full, 4, full * 4, full * 8,
                     full * 4))
    lines.append(row("DreamBooth UNet, AdamW, `full_bf16`", frozen, full, 2, full * 2, full * 4, 0))
    largest = max(p.numel() for p in unet.parameters())
    lines.append(row("DreamBooth UNet, Adafactor, `full_bf16`", frozen, full, 2, full * 2, factored, 0))
    lines.append(row("DreamBooth UNet, Adafactor, `full_bf16`, `fused_backward_pass`", frozen, full, 2,
                     largest * 4, factored, 0))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl-configs", type=Path, help="a diffusers SDXL config folder (model_index.json, ...)")
    args = parser.parse_args(argv)
    configs = REPO / "library" / "models" / "model_configs"
    models = [("SD 1.5", configs / "sd1")]
    sdxl = args.sdxl_configs or configs / "sdxl"
    if (sdxl / "model_index.json").is_file():
        models.append(("SDXL", sdxl))
    for name, folder in models:
        print("\n".join(table(name, folder)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
