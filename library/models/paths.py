"""Where a model comes from, checked without loading anything: built-in names, diffusers folders, single
files and locally cached hub ids. Light on purpose (no torch, diffusers or transformers): `--check` uses it."""
from __future__ import annotations

import re
from pathlib import Path

from library.errors import UserError

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS: tuple[str, ...] = ("tiny-sd15", "tiny-sd2", "tiny-sdxl")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
CONFIG_ROOT = Path(__file__).resolve().parent / "model_configs"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelLoadError(UserError, RuntimeError):
    """A model path cannot be loaded; the message says which file/folder and what to do."""


def cached_hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of a hub repo if the Hugging Face cache has one; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return None


def folder_problem(folder: Path) -> str | None:
    """None for a diffusers model folder, else what is wrong and what to do."""
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
        return folder_problem(target)
    if target.is_file():
        if target.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return None
        return (
            f"Model file {target} has an unsupported type {target.suffix!r}; "
            f"use a {', '.join(SINGLE_FILE_SUFFIXES)} checkpoint or a diffusers folder."
        )
    if target.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return f"Model file not found: {target} (relative paths start at {Path.cwd()})."
    if _HUB_ID.fullmatch(path) and cached_hub_folder(path) is not None:
        return None
    hub_hint = ""
    if _HUB_ID.fullmatch(path):
        hub_hint = (
            f" If it is a Hugging Face model id: Kiln runs offline and it is not in the local cache, so download "
            f"it first (hf download {path} --local-dir models/{path.split('/')[-1]}) and set model.path to that folder."
        )
    return f"Model path not found: {target} is neither a file nor a folder (relative paths start at {Path.cwd()}).{hub_hint}"
