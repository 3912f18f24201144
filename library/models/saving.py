"""Save a whole model where the path says: `*.safetensors` → an original-layout single file (A1111, ComfyUI,
diffusers' from_single_file), anything else → a diffusers folder. Used by DreamBooth and the model tools."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from library.models.diffusers_folder import save_diffusers
from library.models.parts import ModelParts
from library.models.single_file import save_single_file


def model_format(path: Path) -> str:
    """"single_file" for a .safetensors path, else "diffusers" (a folder)."""
    return "single_file" if Path(path).suffix.lower() == ".safetensors" else "diffusers"


def _cpu_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The module rebuilt on the CPU in `dtype`, without first copying it where it lives (a GPU may have no
    room for a second UNet). Buffers are built normally; weights are assigned from the original."""
    with init_empty_weights():
        if hasattr(module, "from_config"):  # diffusers models
            clone = type(module).from_config(module.config)
        else:  # transformers models
            clone = type(module)(module.config)
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
             for k, v in module.state_dict().items()}
    clone.load_state_dict(state, assign=True)
    return clone.eval()


def save_model(parts: ModelParts, path: Path, dtype: torch.dtype) -> None:
    """Write the whole model atomically: `path` ending in .safetensors → an original-layout single file
    (A1111, ComfyUI, diffusers' from_single_file); anything else → a diffusers folder. Floats cast to dtype;
    the modules in `parts` are left as they are (training goes on)."""
    path = Path(path)
    if model_format(path) == "single_file":
        save_single_file(parts, path, dtype)  # casts tensor by tensor on the CPU and writes via temp + rename
        return
    copy = dataclasses.replace(parts, text_encoders=[_cpu_copy(e, dtype) for e in parts.text_encoders],
                               vae=_cpu_copy(parts.vae, dtype), unet=_cpu_copy(parts.unet, dtype))
    save_diffusers(copy, path)  # written to a temporary folder, then moved into place
