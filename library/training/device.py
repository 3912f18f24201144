"""Where a run computes and in what precision, resolved once from [train] before any model loads."""
from __future__ import annotations

import torch

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(requested: str) -> torch.device:
    """train.device: "auto" picks CUDA when there is one, else the CPU."""
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def runtime_problems(device: str, mixed_precision: str) -> list[str]:
    """Settings this machine cannot run, found before any model loads."""
    if device == "cuda" and not torch.cuda.is_available():
        return ["train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"]
    if device == "mps" and not torch.backends.mps.is_available():
        return ["train.device = 'mps' but Apple's MPS backend is not available here; use 'auto' or 'cpu'"]
    if resolve_device(device).type == "cpu" and mixed_precision == "fp16":
        return ["train.mixed_precision = 'fp16' needs a GPU; on the CPU use 'bf16' or 'no'"]
    return []
