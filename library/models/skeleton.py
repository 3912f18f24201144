"""A base model's module tree without its weights (on torch's meta device), built from configs alone, for checks
that need layer sizes before the model loads (`--check`; a LoKr factor that must divide every adapted layer).

The configs come from where loading would take them: the built-in config folders, a diffusers folder (or a
cached hub id), `model.config_dir`, or a single .safetensors file's header (Kiln's embedded configs, else the
shipped config of its family and cross-attention width). A pickled .ckpt shows its shapes only once unpickled,
so it has no skeleton: checks on it run after the model loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError, safe_open

from library.models import ldm_layout as layout
from library.models.builtin import read_json
from library.models.families import ModelFamily, family_for_configs, family_for_ldm_keys
from library.models.parts import ModelParts
from library.models.paths import BUILTIN_PREFIX, CONFIG_ROOT, ModelLoadError, cached_hub_folder

Configs = tuple[dict, list[dict]]  # UNet config, one config per text encoder (family slot order)


def _folder_configs(folder: Path) -> tuple[ModelFamily, Configs] | None:
    unet_config = read_json(folder / "unet" / "config.json")
    family = family_for_configs(unet_config, read_json(folder / "text_encoder" / "config.json"))
    if family is None:
        return None
    return family, (unet_config, [read_json(folder / slot.attribute / "config.json") for slot in family.text_encoders])


def _single_file_configs(path: Path) -> tuple[ModelFamily, Configs] | None:
    with safe_open(str(path), framework="pt") as handle:  # reads the header only
        keys, metadata = list(handle.keys()), handle.metadata() or {}
        shapes = {k: handle.get_slice(k).get_shape() for k in keys if k.endswith("attn2.to_k.weight")}
    family = family_for_ldm_keys(keys)
    if family is None:
        return None
    if "kiln.config.unet" in metadata:  # our own files carry their exact configs
        configs = [json.loads(metadata[f"kiln.config.{slot.attribute}"]) for slot in family.text_encoders]
        return family, (json.loads(metadata["kiln.config.unet"]), configs)
    folder = family.config_folder(layout.ldm_context_dim(shapes))
    return _folder_configs(CONFIG_ROOT / folder) if folder else None


def _configs(path: str, config_dir: str | None) -> tuple[ModelFamily, Configs] | None:
    if path.startswith(BUILTIN_PREFIX):
        return _folder_configs(CONFIG_ROOT / path[len(BUILTIN_PREFIX):])
    target = Path(path).expanduser()
    if target.is_file():
        if config_dir:
            return _folder_configs(Path(config_dir))
        return _single_file_configs(target) if target.suffix.lower() == ".safetensors" else None
    folder = target if target.is_dir() else cached_hub_folder(path)
    return _folder_configs(folder) if folder is not None else None


def model_skeleton(path: str, config_dir: str | None = None) -> ModelParts | None:
    """The UNet and text encoders of the model at `path` on the meta device (no weights read; family, unet and
    text_encoders set, the rest empty), or None when its shapes are not known without loading it."""
    try:
        found = _configs(path, config_dir)
    except (ModelLoadError, OSError, ValueError, KeyError, SafetensorError):  # reported when the model loads
        return None
    if found is None:
        return None
    family, (unet_config, text_configs) = found
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        encoders = [cls(cls.config_class.from_dict(config))
                    for cls, config in zip(family.text_encoder_classes(), text_configs)]
    return ModelParts(family=family, tokenizers=[], text_encoders=encoders, vae=None, unet=unet,
                      noise_scheduler=None, v_prediction=False, source=path)
