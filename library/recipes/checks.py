"""Checks of a raw config that need the file system or a registry (still no model loading): paths exist
(relative ones are resolved against the current folder, then the config's), the model path is loadable, names
exist in the optimizer, scheduler and sampler registries, preview prompts parse, plus the recipe's own.
A path set in a base file (library/config/layers.py) falls back to that file's folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

FolderOf = Callable[[tuple], Path]  # the folder of the file that set a key

from library.models.paths import model_path_problem
from library.recipes.base import Recipe, table
from library.sampling.prompt_file import PromptError, canonical_sampler, parse_prompt_lines, read_prompt_file
from library.registry import optimizer_name_problem
from library.registry import scheduler_name_problem

SHARED_PATH_KEYS = (("dataset", "train_dir", "folder"), ("dataset", "reg_dir", "folder"),
                    ("dataset", "mask_dir", "folder"),
                    ("model", "config_dir", "folder"), ("save", "resume", "folder"),
                    ("sample", "prompt_file", "file"))


def resolve_path(value: str, base: Path) -> Path:
    """Relative paths in a config are relative to the current directory, as users type them in a shell;
    fall back to the config's folder so shipped presets work from anywhere."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    beside = base / p
    return beside if beside.exists() else p


def _check_path(section: dict, key: str, label: str, base: Path, kind: str) -> str | None:
    """Resolve section[key] in place; return a problem if it does not exist."""
    value = section.get(key)
    if not isinstance(value, str) or not value:
        return None
    resolved = resolve_path(value, base)
    exists = resolved.is_dir() if kind == "folder" else resolved.is_file()
    if not exists and resolved.exists():
        other = "a file" if kind == "folder" else "a folder"
        return f"{label}: {value} is {other}, not a {kind}"
    if not exists:
        return f"{label}: {kind} not found: {value}"
    section[key] = str(resolved)
    return None


def _path_problems(data: dict, folder_of: FolderOf, keys: tuple[tuple[str, str, str], ...]) -> list[str]:
    checks = [(table(data, section), key, f"{section}.{key}", kind, folder_of((section, key)))
              for section, key, kind in keys]
    subsets = table(data, "dataset").get("subsets")
    for i, subset in enumerate(subsets if isinstance(subsets, list) else []):
        for key in ("image_dir", "mask_dir") if isinstance(subset, dict) else ():
            checks.append((subset, key, f"dataset.subsets[{i}].{key}", "folder",
                           folder_of(("dataset", "subsets", i, key))))
    return [p for t, key, label, kind, base in checks if (p := _check_path(t, key, label, base, kind))]


def _model_problems(data: dict, folder_of: FolderOf) -> list[str]:
    model = table(data, "model")
    path = model.get("path")
    if not isinstance(path, str) or not path:
        return []
    if not path.startswith("builtin:"):
        resolved = resolve_path(path, folder_of(("model", "path")))
        if resolved.exists():
            path = model["path"] = str(resolved)
    problem = model_path_problem(path)
    return [f"model.path: {problem}"] if problem else []


def _registry_problems(data: dict) -> list[str]:
    problems = []
    for key, check in (("name", optimizer_name_problem), ("scheduler", scheduler_name_problem)):
        value = table(data, "optimizer").get(key)
        if isinstance(value, str) and (problem := check(value)):
            problems.append(f"optimizer.{key}: {problem}")
    return problems


def _sample_problems(data: dict) -> list[str]:
    """The [sample] section: a known sampler, prompt lines that parse, and prompts when previews are asked for."""
    sample = table(data, "sample")
    problems = []
    sampler = sample.get("sampler", "euler_a")
    if isinstance(sampler, str):
        try:
            canonical_sampler(sampler)
        except ValueError as err:
            problems.append(f"sample.sampler: {err}")
    count = 0
    prompts, prompt_file = sample.get("prompts", []), sample.get("prompt_file", "")
    try:
        if isinstance(prompts, list):
            count = len(parse_prompt_lines([str(p) for p in prompts], "sample.prompts"))
        if isinstance(prompt_file, str) and prompt_file and Path(prompt_file).is_file():
            count += len(read_prompt_file(prompt_file))
    except (PromptError, ValueError) as err:
        problems.append(str(err))
    scheduled = any(sample.get(key) for key in ("every_n_steps", "every_n_epochs", "before_training"))
    if scheduled and not count and not problems and not prompt_file:
        problems.append("sample.every_n_steps / every_n_epochs / before_training ask for previews but there "
                        "are no prompts: set sample.prompts or sample.prompt_file")
    return problems


def environment_problems(data: dict, base: Path | FolderOf, recipe: Recipe | None = None) -> list[str]:
    """Every environment problem of the raw config `data`, with the recipe's own when one is given; resolves
    paths in place. `base`: the config's folder, or a function giving the folder of the file that set a key."""
    folder_of = base if callable(base) else (lambda key: base)
    problems = _path_problems(data, folder_of, SHARED_PATH_KEYS + (recipe.path_keys if recipe else ()))
    problems += _model_problems(data, folder_of)
    problems += _registry_problems(data)
    problems += _sample_problems(data)
    return problems + (recipe.environment_problems(data) if recipe else [])


def folder_problem(folder: str | Path, key: str) -> str | None:
    """None when `folder` exists and is writable, or can be created; else why not, naming the key. Creates
    nothing (--check leaves no trace)."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}: {existing} is a file, so {path} cannot be a folder; choose another path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{key}: {existing} is not writable, so nothing can be saved in {path}; choose another folder"
    return None
