"""Will the run's files fit? The planned saves in save.output_dir and the disk latent cache, estimated before the
model loads (library/training/disk_space.py) and checked against each disk's free space — in `--check` and
before every run, so a full disk is found before hours of training, not at the first save."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from library.training.disk_space import human, planned_saves, space_line_and_problem

if TYPE_CHECKING:
    from library.models.header import ModelHeader
    from library.recipes.base import Recipe
    from library.training.resolved import ResolvedRun

_LATENT_FILE_OVERHEAD = 600  # a cache file's safetensors header and metadata, in bytes


def latent_cache_bytes(run: "ResolvedRun") -> int:
    """The disk latent cache of the run's images: per image and flip, mean and std of 4 × h/8 × w/8 floats."""
    data = run.data
    flips = 2 if data.flip_aug else 1
    total = 0
    for index in range(len(data.items)):
        width, height = data.size_of(index)
        total += flips * (2 * 4 * 4 * (width // 8) * (height // 8) + _LATENT_FILE_OVERHEAD)
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def disk_checks(run: "ResolvedRun", recipe: "Recipe", header: "ModelHeader | None") -> tuple[list[str], list[str]]:
    """(summary lines, problems): the planned saves and the latent cache against their disks' free space."""
    config, lines, problems = run.config, [], []
    sizes = recipe.save_sizes(config, header) if header is not None else None
    if sizes is None:
        lines.append("save.output_dir: the size of the saves is known only once the model loads (its weights "
                     "are pickled or have no readable header)")
    else:
        saves = planned_saves(run.plan.total_steps, run.plan.epochs, config.save)
        what = f"{saves.described} (about {human(sizes.artifact)} per file, {human(sizes.state)} per state)"
        advice = "free some space, choose another save.output_dir or lower save.keep_last"
        if config.save.save_state:
            advice += ", or set save.save_state = false"
        line, problem = space_line_and_problem(Path(config.save.output_dir), "save.output_dir", saves.bytes(sizes),
                                               what, advice)
        lines.append(line)
        problems += [problem] if problem else []
    if run.cache_dir is not None:
        needed = max(latent_cache_bytes(run) - folder_bytes(run.cache_dir), 0)
        line, problem = space_line_and_problem(run.cache_dir, "dataset.cache_dir", needed, "the latents not cached yet",
                                               "free some space, choose another dataset.cache_dir, or set "
                                               "dataset.cache_latents = \"memory\"")
        lines.append(line)
        problems += [problem] if problem else []
    return lines, problems
