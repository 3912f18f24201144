"""Dataset folder conventions (kohya `NN_name` folders), caption files and per-sample caption processing.

Layout: `train_dir/25_my concept/` holds images trained 25 times per epoch with class tokens "my concept";
`<image stem><caption_extension>` beside an image is its caption. Regularisation folders use the same layout.
Problems are collected and reported together, each naming the file or folder and the fix.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from library.data.captions import CLASS_TOKENS, COMMON_CAPTION_EXTENSIONS, read_caption
from library.data.errors import DatasetError
from library.data.images import IMAGE_EXTENSIONS, image_problem

# Image formats we do not read, named in notes so they are never skipped silently.
_UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".psd", ".svg")
_LIST_LIMIT = 10
_FOLDER_NAME = re.compile(r"^(\d+)_(.*)$", re.DOTALL)



@dataclass(frozen=True)
class Subset:
    image_dir: Path
    repeats: int
    class_tokens: str
    is_reg: bool = False
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str  # caption file text (stripped, BOM removed) or the class tokens fallback
    caption_from_file: bool
    repeats: int
    is_reg: bool
    subset_index: int


@dataclass
class DatasetScan:
    subsets: list[Subset]
    items: list[ImageItem]  # good images only, train and reg
    missing_captions: list[Path]  # images whose caption fell back to the class tokens (no file, or empty file)
    bad_images: list[tuple[Path, str]]  # (path, reason)
    notes: list[str] = field(default_factory=list)  # hints: caption-extension mismatch, skipped files, ...
    captionless: str = CLASS_TOKENS  # what an image without a caption trains with (see scan_subsets)

    @property
    def train_items(self) -> list[ImageItem]:
        return [item for item in self.items if not item.is_reg]

    @property
    def reg_items(self) -> list[ImageItem]:
        return [item for item in self.items if item.is_reg]

    def num_train_samples(self) -> int:
        """Training samples per epoch: images × repeats, summed over train folders."""
        return sum(item.repeats for item in self.train_items)

    def num_reg_samples(self) -> int:
        return sum(item.repeats for item in self.reg_items)

    def summary_lines(self) -> list[str]:
        """Human-readable report: per folder counts and samples, totals, missing captions, bad images, notes."""
        lines = []
        for index, subset in enumerate(self.subsets):
            items = [item for item in self.items if item.subset_index == index]
            found = sum(item.caption_from_file for item in items)
            bad = sum(path.parent == subset.image_dir for path, _ in self.bad_images)
            kind = "reg  " if subset.is_reg else "train"
            bad_text = f", {_count(bad, 'unreadable image')} left out" if bad else ""
            lines.append(
                f"{kind} {subset.image_dir}: captions {found} found / {len(items) - found} missing{bad_text}; "
                f"{len(items)} images x {subset.repeats} repeats = {len(items) * subset.repeats} samples"
            )
        train, reg = self.train_items, self.reg_items
        lines.append(f"total train: {len(train)} images, {self.num_train_samples()} samples per epoch")
        if any(subset.is_reg for subset in self.subsets):
            lines.append(f"total reg:   {len(reg)} images, {self.num_reg_samples()} samples per epoch "
                         "(before balancing)")
        if self.missing_captions:
            lines.append(f"{_count(len(self.missing_captions), 'image')} without a caption (or with an empty "
                         f"one) use {self.captionless}:")
            lines.extend(_limited([f"  {path}" for path in self.missing_captions]))
        if self.bad_images:
            lines.append(f"{_count(len(self.bad_images), 'image')} cannot be read:")
            lines.extend(_limited([f"  {path}: {reason}" for path, reason in self.bad_images]))
        lines.extend(f"note: {note}" for note in self.notes)
        return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _limited(lines: list[str], limit: int = _LIST_LIMIT) -> list[str]:
    if len(lines) <= limit:
        return lines
    return lines[:limit] + [f"  ... and {len(lines) - limit} more"]


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """Parse "25_my concept" into (25, "my concept").

    Everything after the first "_" is the class tokens, stripped ("5_" gives (5, ""): allowed, such images
    train on their caption files only). Returns None without a numeric prefix and "_", or with 0 repeats.
    """
    match = _FOLDER_NAME.match(name)
    if not match:
        return None
    repeats = int(match.group(1))
    if repeats < 1:
        return None
    return repeats, match.group(2).strip()


def _suggest_folder_name(name: str) -> str:
    """A valid NN_name close to what the user wrote ("cat" -> "10_cat", "cat_5" -> "5_cat", "0_cat" -> "1_cat")."""
    if re.match(r"^0+_", name):
        return "1_" + name.split("_", 1)[1]
    match = re.match(r"^(\d+)\s*[-. ]\s*(.+)$", name)  # "10 cat", "10-cat"
    if match and int(match.group(1)) > 0:
        return f"{int(match.group(1))}_{match.group(2)}"
    match = re.match(r"^(.+?)[\s_-]+(\d+)$", name)  # "cat_10", "cat 10"
    if match and int(match.group(2)) > 0:
        return f"{int(match.group(2))}_{match.group(1)}"
    if re.fullmatch(r"\d+", name) and int(name) > 0:
        return f"{name}_my concept"
    return f"10_{name}"


def _is_image(path: Path) -> bool:
    """A training image: an image file that is not a loss mask (`<stem>.mask.png`, library/data/masks.py)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.stem.lower().endswith(".mask")


def subsets_from_folder(root: Path, is_reg: bool = False, caption_extension: str = ".txt") -> list[Subset]:
    """Subsets from the direct `NN_name` subfolders of `root` (hidden folders ignored).

    Raises one DatasetError listing every problem: `root` missing, subfolders without a repeat-count prefix
    (with the name they should have), images placed directly in `root`, or no subfolders at all.
    """
    root = Path(root)
    role = "reg_dir" if is_reg else "train_dir"
    if not root.exists():
        raise DatasetError(f"{role} {root} does not exist; check the path in your config")
    if not root.is_dir():
        raise DatasetError(
            f"{role} {root} is a file, not a folder; point {role} at the folder that holds NN_name/ folders"
        )
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    problems: list[str] = []
    subsets: list[Subset] = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        parsed = parse_folder_name(entry.name)
        if parsed is None:
            suggestion = root / _suggest_folder_name(entry.name)
            problems.append(
                f'folder "{entry}" has no repeat count: rename it to "{suggestion}" '
                "(NN_name: NN = repeats per epoch, name = class tokens)"
            )
            continue
        repeats, tokens = parsed
        subsets.append(Subset(entry, repeats, tokens, is_reg, caption_extension))
    loose = [entry for entry in entries if entry.is_file() and _is_image(entry)]
    if loose:
        example = root / "10_my concept"
        problems.append(
            f"{_count(len(loose), 'image')} directly in {role} {root} (e.g. {loose[0].name}); images must be in "
            f'subfolders named NN_name, e.g. move them to "{example}" to train them 10 times per epoch '
            'with class tokens "my concept"'
        )
    if not subsets and not problems:
        problems.append(
            f"{role} {root} has no NN_name subfolders; put your images in a folder such as "
            f'"{root / "10_my concept"}" (10 repeats per epoch, class tokens "my concept")'
        )
    if problems:
        raise DatasetError(problems)
    return subsets


def _normalise_extension(ext: str) -> str:
    return ext if ext.startswith(".") else "." + ext


@dataclass
class _FolderListing:
    images: list[Path]
    by_lower_name: dict[str, Path]
    other_suffixes: Counter
    subfolders: list[Path]


def _list_folder(folder: Path) -> _FolderListing:
    images, by_lower, other, subfolders = [], {}, Counter(), []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders.append(entry)
        elif _is_image(entry):
            images.append(entry)
        else:
            by_lower[entry.name.lower()] = entry
            other[entry.suffix.lower() or "(no extension)"] += 1
    return _FolderListing(images, by_lower, other, subfolders)


def _find_caption(image: Path, ext: str, listing: _FolderListing) -> Path | None:
    exact = image.with_suffix(ext)
    if exact.is_file():
        return exact
    # Tolerate "IMG.TXT" beside "IMG.png" (case-insensitive file systems make such datasets common).
    return listing.by_lower_name.get(exact.name.lower())


def _found_text(listing: _FolderListing) -> str:
    parts = [f"{count} '{suffix}' files" for suffix, count in sorted(listing.other_suffixes.items())]
    if listing.subfolders:
        names = ", ".join(p.name for p in listing.subfolders[:5])
        parts.append(f"subfolders ({names}) which are not searched")
    return ", ".join(parts) if parts else "nothing"


def _folder_notes(subset: Subset, listing: _FolderListing, ext: str, missing: list[Path], captionless: str
                  ) -> list[str]:
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
                    f"{subset.image_dir}: {_count(matches, 'image')} without a '{ext}' caption have a "
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


def _check_images(paths: list[Path], workers: int | None) -> list[str | None]:
    """image_problem for each path, in order; decoding releases the GIL, so threads give a real speed-up."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 2:
        return [image_problem(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(image_problem, paths))


def scan_subsets(subsets: list[Subset], check_images: bool = True, workers: int | None = None,
                 captionless: str = CLASS_TOKENS) -> DatasetScan:
    """Find every subset's images and captions (not recursive; sorted by file name).

    Missing or empty captions fall back to the class tokens. With `check_images`, every image is fully
    decoded and failures go to `bad_images` (never raised: the trainer applies skip_bad_images).
    Raises DatasetError, listing all problems at once, for missing folders, non-UTF-8 captions,
    bad repeat counts, and for train (or reg) folders that contain no images at all.
    """
    if not subsets:
        raise DatasetError("no dataset folders to scan; set dataset.train_dir to a folder holding NN_name/ folders")
    problems: list[str] = []
    candidates: list[tuple[int, Path, Path | None]] = []  # (subset index, image, caption file)
    listings: dict[int, _FolderListing] = {}
    for index, subset in enumerate(subsets):
        if subset.repeats < 1:
            problems.append(f"{subset.image_dir}: repeats must be at least 1, got {subset.repeats}")
        if not subset.image_dir.is_dir():
            problems.append(f"dataset folder {subset.image_dir} does not exist; check the path or create it")
            continue
        listing = listings[index] = _list_folder(subset.image_dir)
        ext = _normalise_extension(subset.caption_extension)
        for image in listing.images:
            candidates.append((index, image, _find_caption(image, ext, listing)))
    problems.extend(_empty_problems(subsets, listings))

    captions: list[str] = []
    for index, image, caption_path in candidates:
        try:
            captions.append(read_caption(caption_path) if caption_path is not None else "")
        except DatasetError as exc:
            problems.extend(exc.problems)
            captions.append("")
    if problems:  # raised before decoding images, which can take minutes on large datasets
        raise DatasetError(problems)

    reasons = _check_images([c[1] for c in candidates], workers) if check_images else [None] * len(candidates)
    items, missing, bad = [], [], []
    for (index, image, _), caption, reason in zip(candidates, captions, reasons):
        if reason is not None:
            bad.append((image, reason))
            continue
        subset = subsets[index]
        from_file = bool(caption)
        if not from_file:
            missing.append(image)
            caption = subset.class_tokens
        items.append(ImageItem(image, caption, from_file, subset.repeats, subset.is_reg, index))

    notes = []
    for index, listing in listings.items():
        subset = subsets[index]
        folder_missing = [p for p in missing if p.parent == subset.image_dir]
        notes.extend(_folder_notes(subset, listing, _normalise_extension(subset.caption_extension), folder_missing,
                                   captionless))
    return DatasetScan(list(subsets), items, missing, bad, notes, captionless)


def _empty_problems(subsets: list[Subset], listings: dict[int, _FolderListing]) -> list[str]:
    """Errors for train (or reg) folders that together hold no images, saying what they hold instead."""
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
        problems.append(
            f"no {kind} images found. Searched: {searched}.{hint} supported image types: "
            f"{' '.join(IMAGE_EXTENSIONS)} (subfolders of NN_name folders are not searched)"
        )
    return problems


def balance_reg_items(num_train_samples: int, reg_items: list[ImageItem]) -> list[ImageItem]:
    """kohya's balancing: raise reg repeats (one image at a time, in order, cycling) until reg samples equal
    train samples. More reg samples than train samples are kept as they are (see reg_balance_message)."""
    if not reg_items:
        return []
    repeats = [item.repeats for item in reg_items]
    deficit = num_train_samples - sum(repeats)
    if deficit > 0:
        for k in range(deficit):
            repeats[k % len(repeats)] += 1
    return [replace(item, repeats=n) for item, n in zip(reg_items, repeats)]


def reg_balance_message(num_train_samples: int, reg_items: list[ImageItem]) -> str | None:
    """One line explaining what balance_reg_items does to these reg items, or None when there are none."""
    if not reg_items:
        return None
    reg_samples = sum(item.repeats for item in reg_items)
    if reg_samples < num_train_samples:
        return (f"reg images: {len(reg_items)} images x repeats = {reg_samples} samples < {num_train_samples} "
                f"train samples; reg repeats raised so both give {num_train_samples} samples per epoch")
    if reg_samples > num_train_samples:
        return (f"reg images: {reg_samples} reg samples > {num_train_samples} train samples; all are kept, "
                "so each epoch shows more reg than train samples (lower reg repeats or use fewer reg images "
                "to change this)")
    return f"reg images: {reg_samples} samples, the same as the train samples"


def expand_samples(items: list[ImageItem]) -> list[int]:
    """Item indices, each repeated `repeats` times: one epoch's samples, in a stable order."""
    return [index for index, item in enumerate(items) for _ in range(item.repeats)]
