"""What one dataset folder holds (images, other files by suffix, subfolders), where an image's caption file is,
and the notes and problems a folder's contents call for (caption-extension mismatches, skipped formats,
folders without images)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from library.data.captions import CLASS_TOKENS, COMMON_CAPTION_EXTENSIONS
from library.data.errors import DatasetProblem
from library.data.images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from library.data.folders import Subset

# Image formats we do not read, named in notes so they are never skipped silently.
_UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".psd", ".svg")


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def is_image(path: Path) -> bool:
    """A training image: an image file that is not a loss mask (`<stem>.mask.png`, library/data/masks.py)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.stem.lower().endswith(".mask")


@dataclass
class FolderListing:
    images: list[Path]
    by_lower_name: dict[str, Path]  # every other file, by its name in lower case
    other_suffixes: Counter
    subfolders: list[Path]
    file_names: frozenset[str] = frozenset()  # the exact names of the other files


def list_folder(folder: Path) -> FolderListing:
    """The folder's entries sorted by name, hidden ones left out. One directory read: os.scandir knows each
    entry's type without a stat call per file (a folder of 10,000 images)."""
    images, by_lower, other, subfolders, names = [], {}, Counter(), [], []
    with os.scandir(folder) as entries:
        listed = sorted((entry.name, entry.is_dir()) for entry in entries if not entry.name.startswith("."))
    for name, is_dir in listed:
        path = folder / name
        if is_dir:
            subfolders.append(path)
        elif is_image(path):
            images.append(path)
        else:
            by_lower[name.lower()] = path
            names.append(name)
            other[path.suffix.lower() or "(no extension)"] += 1
    return FolderListing(images, by_lower, other, subfolders, frozenset(names))


def find_caption(image: Path, ext: str, listing: FolderListing) -> Path | None:
    """The caption file beside `image`, from the folder's listing (no file-system call per image)."""
    name = image.stem + ext
    if name in listing.file_names:
        return image.parent / name
    # Tolerate "IMG.TXT" beside "IMG.png" (case-insensitive file systems make such datasets common).
    return listing.by_lower_name.get(name.lower())


def _found_text(listing: FolderListing) -> str:
    parts = [f"{n} '{suffix}' files" for suffix, n in sorted(listing.other_suffixes.items())]
    if listing.subfolders:
        names = ", ".join(p.name for p in listing.subfolders[:5])
        parts.append(f"subfolders ({names}) which are not searched")
    return ", ".join(parts) if parts else "nothing"


def folder_notes(subset: "Subset", listing: FolderListing, ext: str, missing: list[Path], captionless: str
                 ) -> list[str]:
    """Hints about one folder: no images, captions under another extension, skipped formats, subfolders."""
    notes = []
    if not listing.images:
        notes.append(f"{subset.image_dir}: no images in this folder (supported: {' '.join(IMAGE_EXTENSIONS)})")
    if missing:
        for other_ext in COMMON_CAPTION_EXTENSIONS:
            if other_ext == ext:
                continue
            matches = sum(p.with_suffix(other_ext).name.lower() in listing.by_lower_name for p in missing)
            if matches:
                notes.append(
                    f"{subset.image_dir}: {count(matches, 'image')} without a '{ext}' caption have a "
                    f"'{other_ext}' file beside them; if those are your captions, "
                    f'set caption_extension = "{other_ext}"'
                )
        if not subset.class_tokens and captionless == CLASS_TOKENS:
            notes.append(
                f"{subset.image_dir}: the folder name gives no class tokens, so {len(missing)} images without "
                "a caption train with an empty caption"
            )
    skipped = {s: n for s, n in listing.other_suffixes.items() if s in _UNSUPPORTED_IMAGE_EXTENSIONS}
    if skipped:
        kinds = ", ".join(f"{n} '{s}'" for s, n in sorted(skipped.items()))
        notes.append(f"{subset.image_dir}: skipped {kinds} files (supported: {' '.join(IMAGE_EXTENSIONS)})")
    if listing.subfolders:
        names = ", ".join(p.name for p in listing.subfolders[:5])
        notes.append(f"{subset.image_dir}: subfolders are not searched ({names})")
    stems = Counter(p.stem.lower() for p in listing.images)
    shared = sorted(stem for stem, n in stems.items() if n > 1)
    if shared:
        notes.append(f"{subset.image_dir}: images with the same name but different extensions share one caption "
                     f"file ({', '.join(shared[:5])})")
    return notes


def empty_problems(subsets: list["Subset"], listings: dict[int, FolderListing]) -> list[DatasetProblem]:
    """Train (or reg) folders that together hold no images, saying what they hold instead."""
    problems = []
    for is_reg in (False, True):
        group = [i for i, s in enumerate(subsets) if s.is_reg == is_reg and i in listings]
        if not group or any(listings[i].images for i in group):
            continue
        searched = "; ".join(f"{subsets[i].image_dir} (found {_found_text(listings[i])})" for i in group)
        kind = "regularisation" if is_reg else "training"
        hint = ""
        suffixes = set().union(*(listings[i].other_suffixes for i in group))
        if suffixes & set(COMMON_CAPTION_EXTENSIONS):
            hint = " Caption files were found but their images were not;"
        problems.append(DatasetProblem("no_images",
            f"no {kind} images found. Searched: {searched}.{hint} supported image types: "
            f"{' '.join(IMAGE_EXTENSIONS)} (subfolders of NN_name folders are not searched)"
        ))
    return problems
