"""Attention backend selection: xformers when it is installed and usable (CUDA), PyTorch SDPA otherwise."""
from __future__ import annotations

import importlib.util

import torch


def xformers_problem(device: torch.device) -> str | None:
    """Why xformers cannot be used here, or None when it can."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if device.type != "cuda":
        return f"xformers needs CUDA, this run is on {device.type}"
    return None


def select_attention(models: list, requested: str, device: torch.device) -> str:
    """Set the attention backend on diffusers models and return the one-line report.

    requested: "auto" | "sdpa" | "xformers". Asking for xformers where it cannot run is an error;
    auto falls back to SDPA and says why."""
    problem = xformers_problem(device)
    if requested == "xformers" and problem:
        raise RuntimeError(f"train.attention = 'xformers' but {problem}; use 'auto' or 'sdpa'")
    if requested in ("auto", "xformers") and problem is None:
        try:
            for model in models:
                model.enable_xformers_memory_efficient_attention()
            return "attention: xformers"
        except Exception as err:  # a broken xformers build must not stop training when auto was asked
            if requested == "xformers":
                raise RuntimeError(f"xformers failed to enable: {err}") from err
            problem = f"xformers failed to enable ({str(err).splitlines()[0]})"
    # diffusers' default processor on torch 2 is SDPA (AttnProcessor2_0); nothing to switch
    if requested == "auto":
        return f"attention: PyTorch SDPA ({problem})"
    return "attention: PyTorch SDPA"
