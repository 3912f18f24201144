"""Dataset folder conventions (kohya `NN_name` folders), caption files and per-sample caption processing.

Layout: `train_dir/25_my concept/` holds images trained 25 times per epoch with class tokens "my concept";
`<image stem><caption_extension>` beside an image is its caption. Regularisation folders use the same layout.
Problems are collected and reported together, each naming the file or folder and the fix.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from library.data.captions import CLASS_TOKENS, caption_or_problem
from library.data.errors import DatasetError, DatasetProblem
from library.data.images import ImageCheck, check_image
from library.data.listing import (FolderListing, count as _count, empty_problems, find_caption, folder_notes,
                                  is_image, list_folder)

_LIST_LIMIT = 10
_CHECK_CHUNK = 64  # images per thread-pool task in the scan
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
    size: tuple[int, int] | None = field(default=None, compare=False)  # upright (width, height) the scan read


@dataclass
class DatasetScan:
    subsets: list[Subset]
    items: list[ImageItem]  # good images only, train and reg
    missing_captions: list[Path]  # images whose caption fell back to the class tokens (no file, or empty file)
    bad_images: list[tuple[Path, str]]  # (path, reason)
    notes: list[str] = field(default_factory=list)  # hints: caption-extension mismatch, skipped files, ...
    captionless: str = CLASS_TOKENS  # what an image without a caption trains with (see scan_subsets)
    bad_captions: list[tuple[Path, str]] = field(default_factory=list)  # (caption file, reason); image left out
    problems: list[DatasetProblem] = field(default_factory=list)  # missing folders, bad repeats, no images

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

    def unreadable(self) -> list[DatasetProblem]:
        """Captions and images that cannot be read, each with its path and reason (skip_bad_images skips them)."""
        return ([DatasetProblem("caption", f"{path}: {reason}") for path, reason in self.bad_captions]
                + [DatasetProblem("image", f"{path}: {reason}") for path, reason in self.bad_images])

    def summary_lines(self) -> list[str]:
        """Human-readable report: per folder counts and samples, totals, missing captions, bad images, notes."""
        lines = []
        for index, subset in enumerate(self.subsets):
            items = [item for item in self.items if item.subset_index == index]
            found = sum(item.caption_from_file for item in items)
            bad = len({path.parent / path.stem for path, _ in self.bad_images + self.bad_captions
                       if path.parent == subset.image_dir})
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
        if self.bad_captions:
            own = "its" if len(self.bad_captions) == 1 else "their"
            lines.append(f"{_count(len(self.bad_captions), 'image')} left out because {own} caption cannot be read:")
            lines.extend(_limited([f"  {path}: {reason}" for path, reason in self.bad_captions]))
        lines.extend(f"note: {note}" for note in self.notes)
        return lines


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


def _name_problem(folder: Path) -> DatasetProblem:
    suggestion = folder.parent / _suggest_folder_name(folder.name)
    what = ("has 0 repeats, so it would never train" if re.match(r"^0+_", folder.name)
            else "has no repeat count")
    return DatasetProblem("name", f'{folder} {what}: rename it to "{suggestion}"')


@dataclass
class FoundSubsets:
    """What a train_dir or reg_dir holds: its NN_name folders, the problems of its layout, and its misnamed
    folders as provisional subsets (1 repeat), so one scan also checks the images and captions inside them."""

    subsets: list[Subset]
    problems: list[DatasetProblem]
    misnamed: list[Subset]


def find_subsets(root: Path, is_reg: bool = False, caption_extension: str = ".txt") -> FoundSubsets:
    """The direct `NN_name` subfolders of `root` (hidden folders ignored), and every problem of the layout:
    `root` missing, subfolders without a repeat-count prefix (with the name they should have), images placed
    directly in `root`, or no subfolders at all."""
    root = Path(root)
    role = "reg_dir" if is_reg else "train_dir"
    if not root.exists():
        return FoundSubsets([], [DatasetProblem("location", f"{role} {root} does not exist; check the path in "
                                                            "your config")], [])
    if not root.is_dir():
        return FoundSubsets([], [DatasetProblem("location", f"{role} {root} is a file, not a folder; point {role} "
                                                            "at the folder that holds NN_name/ folders")], [])
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    found = FoundSubsets([], [], [])
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        parsed = parse_folder_name(entry.name)
        if parsed is None:
            found.problems.append(_name_problem(entry))
            found.misnamed.append(Subset(entry, 1, entry.name, is_reg, caption_extension))
            continue
        repeats, tokens = parsed
        found.subsets.append(Subset(entry, repeats, tokens, is_reg, caption_extension))
    loose = [entry for entry in entries if entry.is_file() and is_image(entry)]
    if loose:
        example = root / "10_my concept"
        found.problems.append(DatasetProblem("location",
            f"{_count(len(loose), 'image')} directly in {role} {root} (e.g. {loose[0].name}); images must be in "
            f'subfolders named NN_name, e.g. move them to "{example}" to train them 10 times per epoch '
            'with class tokens "my concept"'
        ))
    if not found.subsets and not found.problems:
        found.problems.append(DatasetProblem("location",
            f"{role} {root} has no NN_name subfolders; put your images in a folder such as "
            f'"{root / "10_my concept"}" (10 repeats per epoch, class tokens "my concept")'
        ))
    return found


def subsets_from_folder(root: Path, is_reg: bool = False, caption_extension: str = ".txt") -> list[Subset]:
    """find_subsets' subsets; one DatasetError listing every problem of the layout."""
    found = find_subsets(root, is_reg, caption_extension)
    if found.problems:
        raise DatasetError(found.problems, [Path(root)])
    return found.subsets


def _normalise_extension(ext: str) -> str:
    return ext if ext.startswith(".") else "." + ext


def _check_chunk(paths: list[Path]) -> list[ImageCheck]:
    return [check_image(path) for path in paths]


def _check_images(paths: list[Path], workers: int | None) -> list[ImageCheck]:
    """check_image for each path, in order; decoding releases the GIL, so threads give a real speed-up. Paths go
    to the threads in chunks: one task per small image would cost more than checking it."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 2:
        return _check_chunk(paths)
    size = max(1, min(_CHECK_CHUNK, len(paths) // workers))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = pool.map(_check_chunk, [paths[i:i + size] for i in range(0, len(paths), size)])
        return [check for chunk in chunks for check in chunk]


def _list_subsets(subsets: list[Subset]) -> tuple[list[tuple[int, Path, Path | None]], dict[int, FolderListing],
                                                  list[DatasetProblem]]:
    """(subset index, image, caption file) for every image, each folder's listing, and missing folders."""
    problems: list[DatasetProblem] = []
    candidates: list[tuple[int, Path, Path | None]] = []
    listings: dict[int, FolderListing] = {}
    for index, subset in enumerate(subsets):
        if subset.repeats < 1:
            problems.append(DatasetProblem("location", f"{subset.image_dir}: repeats must be at least 1, got "
                                                       f"{subset.repeats}"))
        if not subset.image_dir.is_dir():
            problems.append(DatasetProblem("location", f"dataset folder {subset.image_dir} does not exist; check "
                                                       "the path or create it"))
            continue
        listing = listings[index] = list_folder(subset.image_dir)
        ext = _normalise_extension(subset.caption_extension)
        for image in listing.images:
            candidates.append((index, image, find_caption(image, ext, listing)))
    return candidates, listings, problems + empty_problems(subsets, listings)


def collect_scan(subsets: list[Subset], check_images: bool = True, workers: int | None = None,
                 captionless: str = CLASS_TOKENS) -> DatasetScan:
    """Find every subset's images and captions (not recursive; sorted by file name), collecting every problem
    instead of raising: missing folders, bad repeats and folders without images in `problems`, captions that
    cannot be read in `bad_captions`, and (with `check_images`, every image fully decoded) images that cannot
    be read in `bad_images`. Images of either list are left out of `items`; missing or empty captions fall
    back to the class tokens."""
    if not subsets:
        return DatasetScan([], [], [], [], problems=[DatasetProblem(
            "location", "no dataset folders to scan; set dataset.train_dir to a folder holding NN_name/ folders")])
    candidates, listings, problems = _list_subsets(subsets)
    checks = _check_images([c[1] for c in candidates], workers) if check_images else [ImageCheck(None)] * len(
        candidates)
    items, missing, bad, bad_captions = [], [], [], []
    for (index, image, caption_path), check in zip(candidates, checks):
        reason = check.problem
        caption, caption_reason = caption_or_problem(caption_path) if caption_path is not None else ("", None)
        if caption_reason is not None:
            bad_captions.append((caption_path, caption_reason))
        if reason is not None:
            bad.append((image, reason))
        if reason is not None or caption_reason is not None:
            continue
        subset = subsets[index]
        from_file = bool(caption)
        if not from_file:
            missing.append(image)
            caption = subset.class_tokens
        items.append(ImageItem(image, caption, from_file, subset.repeats, subset.is_reg, index, check.size))

    notes = []
    for index, listing in listings.items():
        subset = subsets[index]
        folder_missing = [p for p in missing if p.parent == subset.image_dir]
        notes.extend(folder_notes(subset, listing, _normalise_extension(subset.caption_extension), folder_missing,
                                  captionless))
    return DatasetScan(list(subsets), items, missing, bad, notes, captionless, bad_captions, problems)


def scan_subsets(subsets: list[Subset], check_images: bool = True, workers: int | None = None,
                 captionless: str = CLASS_TOKENS) -> DatasetScan:
    """collect_scan, raising one DatasetError for every problem but unreadable images (listed in `bad_images`
    for the caller to refuse or skip): missing folders, bad repeats, folders without images and captions that
    cannot be read."""
    scan = collect_scan(subsets, check_images, workers, captionless)
    problems = scan.problems + [p for p in scan.unreadable() if p.kind == "caption"]
    if problems:
        raise DatasetError(problems, notes=scan.notes)
    return scan


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
