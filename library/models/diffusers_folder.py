"""diffusers model folders: load one offline (each component with from_pretrained, local files only) and
write one that diffusers, sd-scripts and older transformers installs read."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from library.faults import fault_point
from library.models.builtin import read_json
from library.models.dtypes import PartDtypes
from library.models.families import ModelFamily, family_for_configs, supported_labels
from library.models.parts import ModelParts, training_scheduler
from library.models.paths import ModelLoadError, folder_problem
from library.models.tensor_files import own_memory, read_safetensors, safetensors_header

# Scheduler settings every SD1/SD2/SDXL base model was trained with; used when a folder has none.
DEFAULT_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                     "num_train_timesteps": 1000}


def family_from_configs(unet_config: Mapping, text_config: Mapping, where: str) -> ModelFamily:
    """The model family of diffusers configs; ModelLoadError naming what was found when none supports them."""
    if unet_config.get("in_channels", 4) != 4:
        raise ModelLoadError(
            f"{where}: the UNet takes {unet_config['in_channels']} input channels (an inpainting or depth model); "
            "Kiln trains text-to-image models with 4 latent channels.")
    family = family_for_configs(unet_config, text_config)
    if family is None:
        extra = unet_config.get("addition_embed_type")
        found = f"cross-attention width {unet_config.get('cross_attention_dim')}" + (
            f", extra conditioning {extra!r}" if extra else "")
        raise ModelLoadError(f"{where}: a model of an unsupported family ({found}); Kiln trains {supported_labels()}.")
    return family


def _variant(component_dir: Path) -> str | None:
    """"fp16" when a component folder only has fp16-variant weights (``--variant fp16`` downloads)."""
    names = [p.name for p in component_dir.glob("*") if p.suffix in (".safetensors", ".bin")]
    if any(".fp16." in n for n in names) and not any(".fp16." not in n for n in names):
        return "fp16"
    return None


def _lean_component(cls, component_dir: Path, variant: str | None, dtype: torch.dtype):
    """A diffusers model built empty from its config and given its weights read tensor by tensor in `dtype`
    (library/models/tensor_files.py), or None when the folder holds them otherwise (.bin, shards, old key
    names): diffusers' own loader reads those."""
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    weights = component_dir / name
    if not weights.is_file():
        return None
    with init_empty_weights():
        model = cls.from_config(cls.load_config(component_dir, local_files_only=True))
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    if safetensors_header(weights)[0] != expected:
        return None
    model.load_state_dict(read_safetensors(weights, dict.fromkeys(expected, dtype)), strict=True, assign=True)
    return model.eval()


def _diffusers_component(cls, folder: Path, sub: str, dtype: torch.dtype):
    variant = _variant(folder / sub)
    model = _lean_component(cls, folder / sub, variant, dtype)
    if model is None:
        model = cls.from_pretrained(folder, subfolder=sub, local_files_only=True, torch_dtype=dtype, variant=variant)
        if dtype == torch.float32:
            own_memory(model)
    return model


def load_diffusers_folder(folder: Path, dtypes: PartDtypes) -> tuple[ModelParts, str | None]:
    """Load each component offline in its dtype (text encoders read wider for fp32 token embeddings are
    finished by cast_parts); returns (parts, v-pred reason)."""
    problem = folder_problem(folder)
    if problem:
        raise ModelLoadError(problem)
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise ModelLoadError(f"{folder} has no {sub}/config.json; a diffusers SD model needs unet/, vae/ and "
                                 "text_encoder/.")
    # Decide the family from the configs first, so unsupported models fail before any weights load.
    family = family_from_configs(read_json(folder / "unet" / "config.json"),
                                 read_json(folder / "text_encoder" / "config.json"), str(folder))
    text_dtype, vae_dtype = dtypes.text_read_dtype(), dtypes.vae_for(read_json(folder / "vae" / "config.json"))
    try:
        unet = _diffusers_component(UNet2DConditionModel, folder, "unet", dtypes.unet)
        vae = _diffusers_component(AutoencoderKL, folder, "vae", vae_dtype)
        # transformers reads the (small) text encoders tensor by tensor in the requested dtype itself
        encoders = [cls.from_pretrained(folder, subfolder=slot.attribute, local_files_only=True, dtype=text_dtype,
                                        variant=_variant(folder / slot.attribute))
                    for slot, cls in zip(family.text_encoders, family.text_encoder_classes())]
        if text_dtype == torch.float32:
            for encoder in encoders:
                own_memory(encoder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot load the diffusers model in {folder}: {exc}") from exc
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path) if scheduler_path.is_file() else dict(DEFAULT_SCHEDULER)
    reason = "from scheduler/scheduler_config.json" if "prediction_type" in scheduler_config else None
    v_prediction = scheduler_config.get("prediction_type") == "v_prediction"
    parts = ModelParts(family=family, tokenizers=folder_tokenizers(folder, family), text_encoders=encoders,
                       vae=vae, unet=unet, noise_scheduler=training_scheduler(scheduler_config, v_prediction),
                       v_prediction=v_prediction, source=folder.resolve().name)
    return parts, reason


def folder_tokenizers(folder: Path, family: ModelFamily) -> list:
    """The folder's own tokenizers where it has them, else the family's (built offline)."""
    built = family.build_tokenizers()
    return [CLIPTokenizer.from_pretrained(folder / slot.tokenizer) if (folder / slot.tokenizer).is_dir() else own
            for slot, own in zip(family.text_encoders, built)]


# ----------------------------------------------------------------------------------------- saving


def _replace_folder(temporary: Path, folder: Path) -> None:
    """Move a fully written temporary folder into place, replacing ``folder`` only once it is complete."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(temporary, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_legacy_tokenizer_files(tokenizer_dir: Path) -> None:
    """Add vocab.json/merges.txt beside tokenizer.json for readers on transformers 4's slow tokenizer."""
    model = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _write_legacy_text_encoder_keys(text_encoder_dir: Path) -> None:
    """Give the text-encoder weights the ``text_model.`` prefix transformers 4 expects.

    transformers 5 saves a freshly built CLIPTextModel without it; transformers 4 (which sd-scripts and older
    diffusers installs use) would then silently start from random text-encoder weights. transformers 5
    reads the prefixed names as well. (Projection weights of a CLIPTextModelWithProjection keep their names.)
    """
    for shard in sorted(text_encoder_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        tensors = load_file(str(shard))
        renamed = {_legacy_name(k): v for k, v in tensors.items()}
        if renamed.keys() == tensors.keys():
            continue
        renamed_path = shard.with_name(shard.name + ".renamed")
        save_file(renamed, str(renamed_path), metadata=metadata)
        os.replace(renamed_path, shard)
    index_path = text_encoder_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["weight_map"] = {_legacy_name(k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")


def _legacy_name(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def save_diffusers(parts: ModelParts, folder: Path) -> None:
    """Write a diffusers folder (safetensors weights, DDIM sampler config); replaces ``folder`` atomically-ish."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        fault_point("artifact-write", folder)
        parts.pipeline().save_pretrained(temporary, safe_serialization=True)
        for slot in parts.family.text_encoders:
            _write_legacy_tokenizer_files(temporary / slot.tokenizer)
            _write_legacy_text_encoder_keys(temporary / slot.attribute)
        fault_point("artifact-before-rename", folder)
        _replace_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
