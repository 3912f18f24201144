"""Built-in tiny models: each family's architecture at toy size with seeded random weights, for tests, the
quick start and benchmarks. Two builds are bitwise identical; no file is read but the shipped configs."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from library.models.families import family_for_configs
from library.models.parts import ModelParts, training_scheduler
from library.models.paths import BUILTIN_MODELS, BUILTIN_PREFIX, CONFIG_ROOT, ModelLoadError, model_path_problem

_BUILTIN_SEED = 20240601
# Each built-in draws its own weights: tiny-sdxl's VAE must not be tiny-sd15's with another name (a latent
# cache keyed on the VAE would then rightly be shared, and would not show that SDXL gets its own).
_SEED_OFFSETS = {"tiny-sdxl": 1000}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"Cannot read model config {path}: {exc}") from exc


def build_random(folder: Path, seed: int, source: str, dtype: torch.dtype = torch.float32) -> ModelParts:
    """A model of the diffusers configs in `folder` with seeded random weights (the built-ins; benchmarks build
    full-size architectures this way). The global torch RNG is left untouched. Each component has its own
    seed, so changing one config leaves the others' weights unchanged. Each is cast to `dtype` as soon as it
    is built (a full-size SDXL never exists whole in fp32)."""
    unet_config = read_json(folder / "unet" / "config.json")
    text_config = read_json(folder / "text_encoder" / "config.json")
    family = family_for_configs(unet_config, text_config)
    if family is None:
        raise ModelLoadError(f"{folder}: the configs match no model family")
    encoders = []
    with torch.random.fork_rng(devices=[]):
        for index, (slot, cls) in enumerate(zip(family.text_encoders, family.text_encoder_classes())):
            torch.manual_seed(seed + (3 + index if index else 0))  # the first encoder keeps its original seed
            config = cls.config_class.from_dict(read_json(folder / slot.attribute / "config.json"))
            encoders.append(torch.nn.Module.to(cls(config).eval(), dtype))
        torch.manual_seed(seed + 1)
        vae = torch.nn.Module.to(AutoencoderKL.from_config(read_json(folder / "vae" / "config.json")), dtype)
        torch.manual_seed(seed + 2)
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(unet_config), dtype)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    v_prediction = scheduler_config["prediction_type"] == "v_prediction"
    return ModelParts(family=family, tokenizers=family.build_tokenizers(), text_encoders=encoders,
                      vae=vae.eval(), unet=unet.eval(),
                      noise_scheduler=training_scheduler(scheduler_config, v_prediction),
                      v_prediction=v_prediction, source=source)


def build_builtin(name: str) -> ModelParts:
    """A built-in tiny model (library/models/model_configs/<name>/); two builds are bitwise identical."""
    name = name.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(model_path_problem(BUILTIN_PREFIX + name) or name)
    return build_random(CONFIG_ROOT / name, _BUILTIN_SEED + _SEED_OFFSETS.get(name, 0), BUILTIN_PREFIX + name)
