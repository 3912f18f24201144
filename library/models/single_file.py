"""Original-layout single-file checkpoints (`.safetensors`, `.ckpt`): read offline through diffusers' own
single-file converters with a local config folder (library/models/model_configs/ or the configs our own files
embed), and written in the layout A1111, ComfyUI and diffusers' from_single_file read.

Pickled files are only ever read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors.torch import save_file

from library.atomic import write_atomically
from library.models import ldm_layout as layout
from library.models.builtin import read_json
from library.models.dtypes import PartDtypes
from library.models.diffusers_folder import DEFAULT_SCHEDULER, folder_tokenizers
from library.models.families import FAMILIES, ModelFamily, family_for_ldm_keys, supported_labels
from library.models.parts import ModelParts, sampling_scheduler, training_scheduler
from library.models.paths import BUILTIN_PREFIX, CONFIG_ROOT, ModelLoadError
from library.models.tensor_files import owned_copy, read_safetensors, safetensors_header
from library.safe_load import UnreadableTensorFile, load_weights_only

# Config files embedded as metadata in our single files, so they reload with the exact architecture.
_CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, only ever through weights_only=True."""
    try:
        data = load_weights_only(path, mmap=zipfile.is_zipfile(path))
    except UnreadableTensorFile as err:
        raise ModelLoadError(f"{err}. Convert it to .safetensors with a tool you trust, or use the model's "
                             ".safetensors version, and point model.path at that.") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if isinstance(data, dict) and "string_to_param" in data:
        raise ModelLoadError(f"{path} is a textual-inversion embedding, not a base model.")
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a {type(data).__name__}, not a state dict of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _part_dtype(key: str, dtypes: PartDtypes, vae_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype an original-layout key loads in; None for what no part uses (EMA copies, schedule buffers)."""
    if key.startswith(layout.UNET_PREFIX):
        return dtypes.unet
    if key.startswith(layout.VAE_PREFIX):
        return vae_dtype
    if key.startswith(layout.TEXT_PREFIXES):
        return dtypes.text_read_dtype()
    return None


def _read_tensors(path: Path, shapes: Mapping[str, tuple], pickled: dict | None, dtypes: PartDtypes,
                  vae_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors the parts use, each cast to its part's dtype as it is read and owning its memory."""
    wanted = {k: d for k in shapes if (d := _part_dtype(k, dtypes, vae_dtype)) is not None}
    if pickled is None:
        return read_safetensors(path, wanted)
    # a pickle is one mapping (or one read) of the whole file; cast tensor by tensor, letting each source go
    return {key: owned_copy(pickled.pop(key), dtype) for key, dtype in wanted.items()}


def _not_a_base_model(path: Path, keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return f"{path} is a LoRA, not a base model: set model.path to the SD checkpoint the LoRA was trained on."
    if any(k in ("emb_params", "string_to_param", "clip_l") for k in keys):
        return f"{path} is a textual-inversion embedding, not a base model."
    return (
        f"{path} is not a Stable Diffusion checkpoint: it has no {layout.UNET_PREFIX}* weights "
        f"(first keys: {keys[:3]}). A UNet-only or diffusers-format file needs the full diffusers folder instead."
    )


def _family_of(path: Path, keys: list[str]) -> ModelFamily:
    if not any(k.startswith(layout.UNET_PREFIX) for k in keys):
        raise ModelLoadError(_not_a_base_model(path, keys))
    family = family_for_ldm_keys(keys)
    if family is not None:
        return family
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelLoadError(f"{path}: an SDXL refiner (its only text encoder is OpenCLIP's); Kiln trains "
                             f"{supported_labels()} (SDXL: the base model).")
    if any(k.startswith((layout.SDXL_PREFIX, "cond_stage_model.")) for k in keys):
        raise ModelLoadError(f"{path}: a checkpoint of an unsupported model family (text encoder keys "
                             f"{next(k for k in keys if k.startswith(('conditioner.', 'cond_stage_model.')))!r}); "
                             f"Kiln trains {supported_labels()}.")
    raise ModelLoadError(f"{path} has no text encoder (cond_stage_model.*); Kiln needs a complete SD checkpoint.")


def _write_config_folder(metadata: Mapping[str, str], family: ModelFamily, folder: Path) -> None:
    """Recreate the config files embedded in our own single files (see save_single_file)."""
    files = {**_CONFIG_FILES, **{slot.attribute: "config.json" for slot in family.text_encoders}}
    for sub, file_name in files.items():
        target = folder / sub / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(metadata[f"kiln.config.{sub}"], encoding="utf-8")


def _shipped_config_dir(path: Path, shapes: Mapping[str, tuple], family: ModelFamily) -> Path:
    """The shipped full-size config folder matching the file's cross-attention width."""
    width = layout.ldm_context_dim(shapes)
    folder = family.config_folder(width)
    if folder is not None:
        return CONFIG_ROOT / folder
    other = next((f for f in FAMILIES if f.config_folder(width) is not None), None)
    if other is not None:
        raise ModelLoadError(f"{path}: a {other.label} UNet with a {family.label} text encoder; the file is "
                             "inconsistent.")
    raise ModelLoadError(f"{path}: unknown UNet architecture (cross-attention width {width}); pass config_dir= a "
                         "diffusers folder with matching unet/vae/text_encoder configs.")


def _v_from_yaml(path: Path) -> bool | None:
    """``parameterization: "v"`` in an A1111-style ``<stem>.yaml`` beside the checkpoint, if there is one."""
    config_path = path.with_suffix(".yaml")
    if not config_path.is_file():
        return None
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        params = config.get("model", {}).get("params", {}) or {}
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"Cannot read the model config {config_path}: {exc}; fix or remove it.") from exc
    return params.get("parameterization") == "v"


def _prediction(path: Path, metadata: Mapping[str, str], family: ModelFamily) -> tuple[bool, str]:
    if "kiln.prediction_type" in metadata:
        return metadata["kiln.prediction_type"] == "v_prediction", "from the file's Kiln metadata"
    from_yaml = _v_from_yaml(path)
    if from_yaml is not None:
        return from_yaml, f"from {path.with_suffix('.yaml').name}"
    if family.is_v2:
        return False, f"assumed for {family.label}; 768-v models need model.v_parameterization = true"
    return False, f"assumed ({family.label} models predict epsilon)"


def _assert_loaded(module: torch.nn.Module, what: str, path: Path) -> None:
    """diffusers leaves weights missing from the file on the meta device; refuse such half-loaded models."""
    missing = [name for name, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{path}: the {what} weights are incomplete ({len(missing)} missing, e.g. {missing[:2]}).")


def _modules(state_dict: dict, family: ModelFamily, config_dir: Path, dtypes: tuple[torch.dtype, ...], path: Path):
    """UNet, VAE and text encoders built empty and given the (already cast) tensors of `state_dict`: diffusers
    assigns them without another copy. `dtypes`: the UNet's, the VAE's and the text encoders'."""
    # Passing float32 explicitly only triggers a spurious diffusers warning about fp32 modules.
    unet_dtype, vae_dtype, text_dtype = (None if dtype == torch.float32 else dtype for dtype in dtypes)
    common = dict(config=str(config_dir), local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", torch_dtype=unet_dtype, **common)
        vae = AutoencoderKL.from_single_file(state_dict, subfolder="vae", torch_dtype=vae_dtype, **common)
        encoders = [create_diffusers_clip_model_from_ldm(cls, state_dict, subfolder=slot.attribute,
                                                         torch_dtype=text_dtype, **common)
                    for slot, cls in zip(family.text_encoders, family.text_encoder_classes())]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load {path} with the configs in {config_dir}: {exc}") from exc
    for module, what in ((unet, "UNet"), (vae, "VAE"), *((e, "text encoder") for e in encoders)):
        _assert_loaded(module, what, path)
    return unet, vae, encoders


def _config_folder(path: Path, config_dir: Path | None, metadata: Mapping[str, str], shapes: Mapping[str, tuple],
                   family: ModelFamily, scratch: Path) -> Path:
    """The diffusers configs describing the file: config_dir, those embedded in our own files, or the shipped
    ones of its family and width."""
    if config_dir is None and "kiln.config.unet" in metadata:
        _write_config_folder(metadata, family, scratch)
        return scratch
    if config_dir is None:
        return _shipped_config_dir(path, shapes, family)
    if not (config_dir / "unet" / "config.json").is_file():
        raise ModelLoadError(f"config_dir {config_dir} has no unet/config.json; pass a diffusers model folder.")
    return config_dir


def load_single_file(path: Path, config_dir: Path | None, dtypes: PartDtypes) -> tuple[ModelParts, str]:
    """Load an original-layout file through diffusers' single-file converters, each part in its dtype (text
    encoders read wider for fp32 token embeddings are finished by cast_parts); returns (parts, v-pred reason).
    A .safetensors file is read tensor by tensor and not kept mapped."""
    if path.suffix.lower() == ".safetensors":
        shapes, metadata = safetensors_header(path)
        pickled = None
    else:
        pickled, metadata = _read_pickle(path), {}
        shapes = {k: tuple(v.shape) for k, v in pickled.items()}
    family = _family_of(path, list(shapes))
    with tempfile.TemporaryDirectory(prefix="kiln-config-") as scratch:
        config_dir = _config_folder(path, config_dir, metadata, shapes, family, Path(scratch))
        vae_dtype = dtypes.vae_for(read_json(config_dir / "vae" / "config.json"))
        state_dict = _read_tensors(path, shapes, pickled, dtypes, vae_dtype)
        del pickled  # what the parts do not use of a pickled file goes now
        unet, vae, encoders = _modules(state_dict, family, config_dir,
                                       (dtypes.unet, vae_dtype, dtypes.text_read_dtype()), path)
        del state_dict  # the modules hold these very tensors: no second copy
        tokenizers = folder_tokenizers(config_dir, family)
        scheduler_path = config_dir / "scheduler" / "scheduler_config.json"
        scheduler_config = read_json(scheduler_path) if scheduler_path.is_file() else dict(DEFAULT_SCHEDULER)
    v_prediction, reason = _prediction(path, metadata, family)
    parts = ModelParts(family=family, tokenizers=tokenizers, text_encoders=encoders, vae=vae, unet=unet,
                       noise_scheduler=training_scheduler(scheduler_config, v_prediction),
                       v_prediction=v_prediction, source=path.name)
    return parts, reason

# ----------------------------------------------------------------------------------------- saving


def _config_json(config: Mapping) -> str:
    # private entries such as _name_or_path (a local path) say nothing about the architecture
    kept = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    for key in ("dtype", "torch_dtype"):
        kept.pop(key, None)
    return json.dumps(kept, default=str)


def _single_file_metadata(parts: ModelParts) -> dict[str, str]:
    metadata = {
        "kiln.config.unet": _config_json(parts.unet.config),
        "kiln.config.vae": _config_json(parts.vae.config),
        "kiln.config.scheduler": _config_json(sampling_scheduler(parts.noise_scheduler).config),
        **{f"kiln.config.{slot.attribute}": _config_json(encoder.config.to_dict())
           for slot, encoder in zip(parts.family.text_encoders, parts.text_encoders)},
        "format": "pt",
        "kiln.family": parts.family.name,
        "kiln.prediction_type": "v_prediction" if parts.v_prediction else "epsilon",
        "kiln.source": parts.source,
    }
    if parts.source.startswith(BUILTIN_PREFIX):
        metadata["kiln.builtin"] = parts.source[len(BUILTIN_PREFIX):]
    return metadata


def save_single_file(parts: ModelParts, path: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write an original-layout checkpoint that A1111/ComfyUI/diffusers load; floats cast to dtype."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"single-file models are written as .safetensors only, got {path}")
    text = parts.family.ldm_text_state_dict([encoder.state_dict() for encoder in parts.text_encoders])
    state_dict = layout.diffusers_to_ldm(parts.unet.state_dict(), parts.unet.config, parts.vae.state_dict(),
                                         parts.vae.config, text)
    tensors = {key: (t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()).contiguous()
               for key, t in state_dict.items()}
    metadata = _single_file_metadata(parts)
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
