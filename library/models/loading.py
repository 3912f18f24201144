"""Load and save Stable Diffusion base models: built-in tiny models, diffusers folders, single files.

Everything here runs offline. Single files are read with safetensors or ``torch.load(weights_only=True)``
and handed to diffusers' own single-file converters together with a local config folder
(``library/model_configs/``), so no config is ever fetched from the hub.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.atomic import write_atomically
from library.models import ldm_layout as layout
from library.models.clip_tokenizer import build_clip_tokenizer

CONFIG_ROOT = Path(__file__).resolve().parent / "model_configs"
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS: tuple[str, ...] = ("tiny-sd15", "tiny-sd2")
_BUILTIN_FAMILY = {"tiny-sd15": "sd1", "tiny-sd2": "sd2"}
_BUILTIN_SEED = 20240601
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_OVERRIDE_HINT = "set model.v_parameterization to override"
# Scheduler settings every SD1/SD2 model was trained with; used when a folder has no scheduler config.
_SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


class ModelLoadError(RuntimeError):
    """A model path cannot be loaded; the message says which file/folder and what to do."""


@dataclass
class ModelParts:
    """The pieces of an SD1/SD2 model the trainers use.

    SDXL will add its second tokenizer/text encoder and size conditioning as further fields with ``None``
    defaults, so code written against these fields keeps working.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # training scheduler; prediction_type matches v_prediction
    family: str  # "sd1" | "sd2"
    v_prediction: bool
    source: str  # what was loaded, e.g. "builtin:tiny-sd15" or a file name

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ModelParts":
        """Move (and optionally cast) the three networks in place; returns self."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            for module in (self.text_encoder, self.vae, self.unet):
                # diffusers' ModelMixin.to warns on every dtype cast (even with nothing to keep in fp32).
                torch.nn.Module.to(module, **kwargs)
        return self

    def pipeline(self, scheduler: Any = None) -> StableDiffusionPipeline:
        """A sampling pipeline sharing these modules (no safety checker); DDIM unless ``scheduler`` is given."""
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler or sampling_scheduler(self.noise_scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def training_scheduler(config: Mapping[str, Any], v_prediction: bool) -> DDPMScheduler:
    """DDPM noise scheduler from a scheduler config (of any scheduler class) with the given prediction type."""
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    prediction = "v_prediction" if v_prediction else "epsilon"
    return DDPMScheduler.from_config(settings, prediction_type=prediction, clip_sample=False)


def sampling_scheduler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM sampler with the training scheduler's betas and prediction type (SD's usual sampler settings)."""
    return DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False, steps_offset=1)


# ----------------------------------------------------------------------------------------- path checks


def _cached_hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of a hub repo if the Hugging Face cache has one; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return None


def _folder_problem(folder: Path) -> str | None:
    if (folder / "model_index.json").is_file() or (folder / "unet").is_dir():
        return None
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SINGLE_FILE_SUFFIXES)[:3]
    hint = f" It holds {', '.join(files)}: point model.path at one of those files." if files else ""
    return (
        f"Model folder {folder} has no model_index.json or unet/ subfolder, so it is not a diffusers model. "
        f"Point model.path at the diffusers model folder itself or at a .safetensors file.{hint}"
    )


def model_path_problem(path: str) -> str | None:
    """None if ``path`` looks loadable, else a one-line message saying what is wrong and what to do.

    Cheap: reads no weights. Accepts "builtin:NAME", a diffusers folder, an existing .safetensors/.ckpt/.pt
    file, or a hub id that is already in the local Hugging Face cache.
    """
    if not path or not str(path).strip():
        return "model.path is empty: set it to builtin:tiny-sd15, a diffusers folder or a .safetensors file."
    path = str(path)
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        if name in BUILTIN_MODELS:
            return None
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        return f"Unknown built-in model {path!r}; the built-in models are {known}."
    target = Path(path).expanduser()
    if target.is_dir():
        return _folder_problem(target)
    if target.is_file():
        if target.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return None
        return (
            f"Model file {target} has an unsupported type {target.suffix!r}; "
            f"use a {', '.join(SINGLE_FILE_SUFFIXES)} checkpoint or a diffusers folder."
        )
    if target.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return f"Model file not found: {target} (relative paths start at {Path.cwd()})."
    if _HUB_ID.fullmatch(path) and _cached_hub_folder(path) is not None:
        return None
    hub_hint = ""
    if _HUB_ID.fullmatch(path):
        hub_hint = (
            f" If it is a Hugging Face model id: Kiln runs offline and it is not in the local cache, so download "
            f"it first (hf download {path} --local-dir models/{path.split('/')[-1]}) and set model.path to that folder."
        )
    return f"Model path not found: {target} is neither a file nor a folder (relative paths start at {Path.cwd()}).{hub_hint}"


# ----------------------------------------------------------------------------------------- built-ins


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"Cannot read model config {path}: {exc}") from exc


def build_builtin(name: str) -> ModelParts:
    """A tiny SD-shaped model with seeded random weights; two builds are bitwise identical.

    Architecture comes from ``library/model_configs/<name>/``. The global torch RNG is left untouched.
    """
    if name.startswith(BUILTIN_PREFIX):
        name = name[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(model_path_problem(BUILTIN_PREFIX + name) or name)
    folder = CONFIG_ROOT / name
    with torch.random.fork_rng(devices=[]):
        # One seed per component so changing one config leaves the others' weights unchanged.
        torch.manual_seed(_BUILTIN_SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(_read_json(folder / "text_encoder" / "config.json")))
        torch.manual_seed(_BUILTIN_SEED + 1)
        vae = AutoencoderKL.from_config(_read_json(folder / "vae" / "config.json"))
        torch.manual_seed(_BUILTIN_SEED + 2)
        unet = UNet2DConditionModel.from_config(_read_json(folder / "unet" / "config.json"))
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    v_prediction = scheduler_config["prediction_type"] == "v_prediction"
    family = _BUILTIN_FAMILY[name]
    return ModelParts(
        tokenizer=build_clip_tokenizer(family),
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        unet=unet.eval(),
        noise_scheduler=training_scheduler(scheduler_config, v_prediction),
        family=family,
        v_prediction=v_prediction,
        source=BUILTIN_PREFIX + name,
    )


# ----------------------------------------------------------------------------------------- diffusers folders


def _family_from_configs(unet_config: Mapping, text_config: Mapping, where: str) -> str:
    """sd1/sd2 from the cross-attention width, falling back to SD2's linear projections for small models."""
    family = layout.FAMILY_BY_CONTEXT_DIM.get(int(unet_config.get("cross_attention_dim", 0)))
    if unet_config.get("addition_embed_type") == "text_time":
        raise ModelLoadError(f"{where} is an SDXL model; Kiln supports SD1.x and SD2.x models so far.")
    if unet_config.get("in_channels", 4) != 4:
        raise ModelLoadError(
            f"{where}: the UNet takes {unet_config['in_channels']} input channels (an inpainting or depth model); "
            "Kiln trains text-to-image models with 4 latent channels."
        )
    if family is None:
        family = "sd2" if unet_config.get("use_linear_projection") or text_config.get("hidden_act") == "gelu" else "sd1"
    return family


def _variant(component_dir: Path) -> str | None:
    """"fp16" when a component folder only has fp16-variant weights (``--variant fp16`` downloads)."""
    names = [p.name for p in component_dir.glob("*") if p.suffix in (".safetensors", ".bin")]
    if any(".fp16." in n for n in names) and not any(".fp16." not in n for n in names):
        return "fp16"
    return None


def _load_diffusers_folder(folder: Path, dtype: torch.dtype) -> tuple[ModelParts, str | None]:
    """Load each component with from_pretrained(local_files_only=True); returns (parts, v-pred reason)."""
    problem = _folder_problem(folder)
    if problem:
        raise ModelLoadError(problem)
    index_path = folder / "model_index.json"
    if index_path.is_file() and "XL" in str(_read_json(index_path).get("_class_name", "")):
        raise ModelLoadError(f"{folder} is an SDXL model; Kiln supports SD1.x and SD2.x models so far.")
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise ModelLoadError(f"{folder} has no {sub}/config.json; a diffusers SD model needs unet/, vae/ and text_encoder/.")
    # Decide the family from the configs first, so unsupported models fail before any weights load.
    family = _family_from_configs(
        _read_json(folder / "unet" / "config.json"), _read_json(folder / "text_encoder" / "config.json"), str(folder)
    )
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", local_files_only=True, torch_dtype=dtype, variant=_variant(folder / "unet"))
        vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", local_files_only=True, torch_dtype=dtype, variant=_variant(folder / "vae"))
        text_encoder = CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", local_files_only=True, dtype=dtype, variant=_variant(folder / "text_encoder"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot load the diffusers model in {folder}: {exc}") from exc
    tokenizer_dir = folder / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir.is_dir() else build_clip_tokenizer(family)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_path) if scheduler_path.is_file() else dict(_SD_SCHEDULER)
    reason = None
    if "prediction_type" in scheduler_config:
        reason = "from scheduler/scheduler_config.json"
    v_prediction = scheduler_config.get("prediction_type") == "v_prediction"
    parts = ModelParts(tokenizer, text_encoder, vae, unet, training_scheduler(scheduler_config, v_prediction),
                       family, v_prediction, folder.resolve().name)
    return parts, reason


# ----------------------------------------------------------------------------------------- single files


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of a single file; pickles only through weights_only=True."""
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(str(path)), metadata
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"Cannot read {path} as safetensors ({exc}); the file may be incomplete or corrupt.") from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            raise ModelLoadError(
                f"{path} contains pickled Python objects besides tensors, and Kiln never unpickles those "
                "(a pickle can run arbitrary code). Convert it to .safetensors with a tool you trust, or "
                "download the model's .safetensors version, and point model.path at that."
            ) from exc
        raise ModelLoadError(f"Cannot read {path} as a PyTorch checkpoint: {exc}") from exc
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if isinstance(data, dict) and "string_to_param" in data:
        raise ModelLoadError(f"{path} is a textual-inversion embedding, not a base model.")
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a {type(data).__name__}, not a state dict of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def _not_a_base_model(path: Path, keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return f"{path} is a LoRA, not a base model: set model.path to the SD checkpoint the LoRA was trained on."
    if any(k in ("emb_params", "string_to_param", "clip_l") for k in keys):
        return f"{path} is a textual-inversion embedding, not a base model."
    return (
        f"{path} is not a Stable Diffusion checkpoint: it has no {layout.UNET_PREFIX}* weights "
        f"(first keys: {keys[:3]}). A UNet-only or diffusers-format file needs the full diffusers folder instead."
    )


def _write_config_folder(metadata: Mapping[str, str], folder: Path) -> None:
    """Recreate the config files embedded in our own single files (see save_single_file)."""
    for sub, file_name in _EMBEDDED_CONFIGS.items():
        target = folder / sub / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(metadata[f"kiln.config.{sub}"], encoding="utf-8")


def _pick_config_dir(path: Path, state_dict: Mapping, family: str) -> Path:
    """The shipped config folder matching the file's cross-attention width (768 → SD1, 1024 → SD2)."""
    width = layout.ldm_context_dim({k: v.shape for k, v in state_dict.items()})
    shipped = layout.FAMILY_BY_CONTEXT_DIM.get(width or 0)
    if shipped is None:
        raise ModelLoadError(
            f"{path}: unknown UNet architecture (cross-attention width {width}); pass config_dir= a diffusers "
            "folder with matching unet/vae/text_encoder configs."
        )
    if shipped != family:
        raise ModelLoadError(f"{path}: a {shipped} UNet with a {family} text encoder; the file is inconsistent.")
    return CONFIG_ROOT / shipped


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


def _single_file_prediction(path: Path, metadata: Mapping[str, str], family: str) -> tuple[bool, str]:
    if "kiln.prediction_type" in metadata:
        return metadata["kiln.prediction_type"] == "v_prediction", "from the file's Kiln metadata"
    from_yaml = _v_from_yaml(path)
    if from_yaml is not None:
        return from_yaml, f"from {path.with_suffix('.yaml').name}"
    if family == "sd2":
        return False, "assumed for SD2; 768-v models need model.v_parameterization = true"
    return False, "assumed (SD1 models predict epsilon)"


def _assert_loaded(module: torch.nn.Module, what: str, path: Path) -> None:
    """diffusers leaves weights missing from the file on the meta device; refuse such half-loaded models."""
    missing = [name for name, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{path}: the {what} weights are incomplete ({len(missing)} missing, e.g. {missing[:2]}).")


def _load_single_file(path: Path, config_dir: Path | None, dtype: torch.dtype) -> tuple[ModelParts, str]:
    """Load an LDM-layout file through diffusers' single-file converters; returns (parts, v-pred reason)."""
    state_dict, metadata = _read_checkpoint(path)
    keys = list(state_dict)
    if not any(k.startswith(layout.UNET_PREFIX) for k in keys):
        raise ModelLoadError(_not_a_base_model(path, keys))
    family = layout.ldm_text_family(keys)
    if family == "sdxl":
        raise ModelLoadError(f"{path} is an SDXL checkpoint; Kiln supports SD1.x and SD2.x models so far.")
    if family is None:
        raise ModelLoadError(f"{path} has no text encoder (cond_stage_model.*); Kiln needs a complete SD checkpoint.")
    with tempfile.TemporaryDirectory(prefix="kiln-config-") as scratch:
        if config_dir is None and "kiln.config.unet" in metadata:
            config_dir = Path(scratch)
            _write_config_folder(metadata, config_dir)
        elif config_dir is None:
            config_dir = _pick_config_dir(path, state_dict, family)
        elif not (config_dir / "unet" / "config.json").is_file():
            raise ModelLoadError(f"config_dir {config_dir} has no unet/config.json; pass a diffusers model folder.")
        # Passing float32 explicitly only triggers a spurious diffusers warning about fp32 modules.
        torch_dtype = None if dtype == torch.float32 else dtype
        common = dict(config=str(config_dir), local_files_only=True, torch_dtype=torch_dtype)
        try:
            unet = UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", **common)
            vae = AutoencoderKL.from_single_file(state_dict, subfolder="vae", **common)
            text_encoder = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, state_dict, subfolder="text_encoder", config=str(config_dir),
                torch_dtype=torch_dtype, local_files_only=True,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"Cannot load {path} with the configs in {config_dir}: {exc}") from exc
        tokenizer_dir = config_dir / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir.is_dir() else build_clip_tokenizer(family)
        scheduler_path = config_dir / "scheduler" / "scheduler_config.json"
        scheduler_config = _read_json(scheduler_path) if scheduler_path.is_file() else dict(_SD_SCHEDULER)
    for module, what in ((unet, "UNet"), (vae, "VAE"), (text_encoder, "text encoder")):
        _assert_loaded(module, what, path)
    v_prediction, reason = _single_file_prediction(path, metadata, family)
    parts = ModelParts(tokenizer, text_encoder, vae, unet, training_scheduler(scheduler_config, v_prediction),
                       family, v_prediction, path.name)
    return parts, reason


# ----------------------------------------------------------------------------------------- load_model


def load_model(
    path: str,
    v_parameterization: bool | None = None,
    config_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ModelParts:
    """Load a base model from "builtin:NAME", a diffusers folder, a single .safetensors/.ckpt file or a
    locally cached hub id. Prints one line saying what was loaded and how the prediction type was decided.

    v_parameterization: None = auto-detect (folder scheduler config; for single files our metadata, then an
    A1111 ``<stem>.yaml`` beside the file, else epsilon). config_dir: a diffusers folder whose configs
    describe a single file (overrides detection; ignored for other sources). Raises ModelLoadError.
    """
    problem = model_path_problem(path)
    if problem:
        raise ModelLoadError(problem)
    if path.startswith(BUILTIN_PREFIX):
        parts, reason = build_builtin(path), "from the built-in config"
    else:
        target = Path(path).expanduser()
        if not target.exists():
            folder = _cached_hub_folder(path)
            assert folder is not None  # model_path_problem accepted it
            parts, reason = _load_diffusers_folder(folder, dtype)
            parts.source = path
        elif target.is_dir():
            parts, reason = _load_diffusers_folder(target, dtype)
        else:
            parts, reason = _load_single_file(target, Path(config_dir) if config_dir else None, dtype)
        reason = reason or "assumed (the model gives no prediction type)"
    if v_parameterization is not None:
        reason = "as set by model.v_parameterization"
        if v_parameterization != parts.v_prediction:
            parts.v_prediction = v_parameterization
            parts.noise_scheduler = training_scheduler(parts.noise_scheduler.config, v_parameterization)
    elif "v_parameterization" not in reason:
        reason = f"{reason}; {_OVERRIDE_HINT}"
    parts.to(dtype=dtype)  # a no-op where the loader already produced dtype
    kind = "v-prediction" if parts.v_prediction else "epsilon prediction"
    print(f"Model: {parts.source} ({parts.family}, {kind} {reason})")
    return parts


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
    reads the prefixed names as well.
    """
    for shard in sorted(text_encoder_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        tensors = load_file(str(shard))
        if all(k.startswith("text_model.") for k in tensors):
            continue
        renamed = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in tensors.items()}
        renamed_path = shard.with_name(shard.name + ".renamed")
        save_file(renamed, str(renamed_path), metadata=metadata)
        os.replace(renamed_path, shard)
    index_path = text_encoder_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["weight_map"] = {
            (k if k.startswith("text_model.") else "text_model." + k): v for k, v in index["weight_map"].items()
        }
        index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")


def save_diffusers(parts: ModelParts, folder: Path) -> None:
    """Write a diffusers folder (safetensors weights, DDIM sampler config); replaces ``folder`` atomically-ish."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        parts.pipeline().save_pretrained(temporary, safe_serialization=True)
        _write_legacy_tokenizer_files(temporary / "tokenizer")
        _write_legacy_text_encoder_keys(temporary / "text_encoder")
        _replace_folder(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


# Config files embedded as metadata in our single files, so they reload with the exact architecture.
_EMBEDDED_CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                     "scheduler": "scheduler_config.json"}


def _single_file_metadata(parts: ModelParts) -> dict[str, str]:
    text_config = parts.text_encoder.config.to_dict()
    text_config.pop("dtype", None)
    text_config.pop("torch_dtype", None)
    configs = {
        "unet": dict(parts.unet.config),
        "vae": dict(parts.vae.config),
        "text_encoder": text_config,
        "scheduler": dict(sampling_scheduler(parts.noise_scheduler).config),
    }
    # Private entries such as _name_or_path (a local path) say nothing about the architecture.
    configs = {name: {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
               for name, config in configs.items()}
    metadata = {f"kiln.config.{name}": json.dumps(config, default=str) for name, config in configs.items()}
    metadata.update({
        "format": "pt",
        "kiln.family": parts.family,
        "kiln.prediction_type": "v_prediction" if parts.v_prediction else "epsilon",
        "kiln.source": parts.source,
    })
    if parts.source.startswith(BUILTIN_PREFIX):
        metadata["kiln.builtin"] = parts.source[len(BUILTIN_PREFIX) :]
    return metadata


def save_single_file(parts: ModelParts, path: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write an original-layout (LDM) SD checkpoint that A1111/ComfyUI/diffusers load; floats cast to dtype."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"single-file models are written as .safetensors only, got {path}")
    state_dict = layout.diffusers_to_ldm(
        parts.unet.state_dict(), parts.unet.config, parts.vae.state_dict(), parts.vae.config,
        parts.text_encoder.state_dict(), parts.family,
    )
    tensors = {
        key: (t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()).contiguous()
        for key, t in state_dict.items()
    }
    metadata = _single_file_metadata(parts)
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
