"""Load a base model from wherever the config points: a built-in tiny model, a diffusers folder, an
original-layout single file or a hub id already in the local cache. Everything runs offline."""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.builtin import build_builtin
from library.models.diffusers_folder import load_diffusers_folder
from library.models.dtypes import FULL_PRECISION, PartDtypes, cast_parts
from library.models.parts import ModelParts, training_scheduler
from library.models.paths import BUILTIN_PREFIX, ModelLoadError, cached_hub_folder, model_path_problem
from library.models.single_file import load_single_file

_OVERRIDE_HINT = "set model.v_parameterization to override"


def _load(path: str, config_dir: str | None, dtypes: PartDtypes) -> tuple[ModelParts, str, str]:
    """(parts, how the prediction type was decided, what kind of source it was)."""
    if path.startswith(BUILTIN_PREFIX):
        return build_builtin(path), "from the built-in config", "built-in model"
    target = Path(path).expanduser()
    if not target.exists():
        folder = cached_hub_folder(path)
        assert folder is not None  # model_path_problem accepted it
        parts, reason = load_diffusers_folder(folder, dtypes)
        parts.source, form = path, "diffusers folder in the Hugging Face cache"
    elif target.is_dir():
        (parts, reason), form = load_diffusers_folder(target, dtypes), "diffusers folder"
    else:
        parts, reason = load_single_file(target, Path(config_dir) if config_dir else None, dtypes)
        form = "single file"
    return parts, reason or "assumed (the model gives no prediction type)", form


def load_model(path: str, v_parameterization: bool | None = None, config_dir: str | None = None,
               dtypes: PartDtypes | torch.dtype = FULL_PRECISION) -> ModelParts:
    """Load a base model from "builtin:NAME", a diffusers folder, a single .safetensors/.ckpt file or a
    locally cached hub id. The family (SD 1.x, SD 2.x, SDXL) is told from the configs or the weights' names;
    one printed line says what was found and how the prediction type was decided.

    v_parameterization: None = auto-detect (folder scheduler config; for single files our metadata, then an
    A1111 ``<stem>.yaml`` beside the file, else epsilon). config_dir: a diffusers folder whose configs
    describe a single file (overrides detection; ignored for other sources). dtypes: each part's dtype
    (a training run's PartDtypes.for_run), or one dtype for every part; files are read straight into them,
    tensor by tensor. Raises ModelLoadError.
    """
    if isinstance(dtypes, torch.dtype):
        dtypes = PartDtypes.uniform(dtypes)
    problem = model_path_problem(path)
    if problem:
        raise ModelLoadError(problem)
    parts, reason, form = _load(path, config_dir, dtypes)
    if v_parameterization is not None:
        reason = "as set by model.v_parameterization"
        if v_parameterization != parts.v_prediction:
            parts.v_prediction = v_parameterization
            parts.noise_scheduler = training_scheduler(parts.noise_scheduler.config, v_parameterization)
    elif "v_parameterization" not in reason:
        reason = f"{reason}; {_OVERRIDE_HINT}"
    cast_parts(parts, dtypes)  # the built-in models; token embeddings kept fp32; a no-op for the rest
    kind = "v-prediction" if parts.v_prediction else "epsilon prediction"
    encoders = len(parts.text_encoders)
    found = f"{parts.family.label} {form}, {encoders} text encoder{'s' if encoders > 1 else ''}"
    print(f"Model: {parts.source} ({found}; {kind} {reason})")
    return parts
