"""Where a run computes and in what precision, resolved once from [train] before any model loads."""
from __future__ import annotations

import os
import re

import torch

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def resolve_device(requested: str) -> torch.device:
    """train.device: "auto" picks CUDA when there is one (unless `accelerate launch --cpu` asked for the CPU),
    else the CPU; "cuda:N" is GPU number N."""
    if requested != "auto":
        return torch.device(requested)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1"):
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 BF16 / AMX). Without them bf16 convolutions take a
    fallback path hundreds of times slower than fp32 (an SD1.5 VAE encode: 890 s against 1.7 s per image at
    256 px on an AVX2 EPYC). PyTorch's own check is private, hence the fallback."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: assume it has them


def use_device(device: torch.device) -> None:
    """Make a numbered GPU (train.device = "cuda:N") the current one, so that "cuda" means it everywhere —
    accelerate places the optimizer state on "cuda" — before anything is put on it."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def runtime_problems(device: str, mixed_precision: str) -> list[str]:
    """Settings this machine cannot run, found before any model loads."""
    numbered = _CUDA_INDEX.match(device)
    if (device == "cuda" or numbered) and not torch.cuda.is_available():
        return [f"train.device = '{device}' but no CUDA device is available; use 'auto' or 'cpu'"]
    if numbered and int(numbered.group(1)) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        return [f"train.device = '{device}' but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"]
    if device == "mps" and not torch.backends.mps.is_available():
        return ["train.device = 'mps' but Apple's MPS backend is not available here; use 'auto' or 'cpu'"]
    if resolve_device(device).type == "cpu" and mixed_precision == "fp16":
        return ["train.mixed_precision = 'fp16' needs a GPU; on the CPU use 'bf16' or 'no'"]
    return []
