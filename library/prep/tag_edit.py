"""Caption files as tag lists: finding them, batch edits across a dataset, frequency tables, safe rewrites.

The Dataset Tag Editor workflow on the command line. Every rewrite is atomic (temp file + os.replace) and the
previous text is first copied into a fresh `<root>/.caption_backups/<timestamp>/` folder (hidden, so dataset
scans skip it; a later run never writes into an earlier run's folder).
"""
from __future__ import annotations

import difflib
import functools
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError
from library.atomic import write_text_atomically
from library.data.captions import COMMON_CAPTION_EXTENSIONS, read_caption
from library.data.errors import DatasetError
from library.data.images import IMAGE_EXTENSIONS

BACKUP_FOLDER = ".caption_backups"
SEPARATOR = ","


class TagEditError(UserError, ValueError):
    """Bad input to a tag operation; the message names the file, folder or option and the fix."""


# ---------------------------------------------------------------------------------------------- files on disk

def normalise_extension(ext: str) -> str:
    """".txt" for "txt" or ".txt"; refuses empty extensions (the caption would be the image file itself)."""
    ext = ext.strip()
    if not ext or ext == ".":
        raise TagEditError("caption extension must not be empty; use e.g. --caption-ext .txt")
    return ext if ext.startswith(".") else "." + ext


def list_images(root: Path, recursive: bool = True) -> list[Path]:
    """Images in `root` (and its subfolders when `recursive`), sorted; hidden files and folders are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise TagEditError(f"folder {root} does not exist" if not root.exists() else f"{root} is a file, not a folder")
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found.extend(Path(folder) / f for f in files
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def caption_paths(images: list[Path], ext: str) -> dict[Path, Path]:
    """Caption file of each image: `<stem><ext>`, or an existing file whose name differs only in case
    ("IMG.TXT" beside "IMG.png", common on case-insensitive file systems). Files need not exist yet."""
    ext = normalise_extension(ext)
    listings: dict[Path, dict[str, Path]] = {}
    result = {}
    for image in images:
        exact = image.with_suffix(ext)
        if not exact.exists():
            if image.parent not in listings:
                listings[image.parent] = {entry.name.lower(): entry for entry in image.parent.iterdir()}
            exact = listings[image.parent].get(exact.name.lower(), exact)
        result[image] = exact
    return result


def require_images(root: Path, recursive: bool = True) -> list[Path]:
    """list_images, raising a TagEditError naming the folder when there are none."""
    images = list_images(root, recursive)
    if not images:
        where = "or its subfolders " if recursive else ""
        raise TagEditError(f"no images in {root} {where}(supported: {' '.join(IMAGE_EXTENSIONS)})")
    return images


def find_captions(root: Path, ext: str = ".txt", recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """(caption files of the images under `root`, images without one). Raises when no image has a caption,
    naming the folder and any other caption extension found beside the images."""
    ext = normalise_extension(ext)
    images = require_images(root, recursive)
    captions, missing = [], []
    for image, path in caption_paths(images, ext).items():
        if path.is_file():
            captions.append(path)
        else:
            missing.append(image)
    if not captions:
        others = [e for e in COMMON_CAPTION_EXTENSIONS if e != ext and any(i.with_suffix(e).is_file() for i in images)]
        hint = f"; found {', '.join(others)} files instead: pass --caption-ext {others[0]}" if others else ""
        raise TagEditError(f"none of the {len(images)} images in {root} has a '{ext}' caption file{hint}")
    return list(dict.fromkeys(captions)), missing  # a.png and a.jpg share a.txt: edit it once




class Backup:
    """Copies files into `<root>/.caption_backups/<YYYYmmdd-HHMMSS>[-N]/<relative path>` before they change.

    The folder is created on first use and is new for every Backup (a second run in the same second gets
    a `-2` suffix), so an earlier backup is never overwritten.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.folder: Path | None = None
        self.saved: set[Path] = set()

    def _make_folder(self) -> Path:
        base = self.root / BACKUP_FOLDER
        base.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1, 1000):
            candidate = base / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                candidate.mkdir()  # fails if it exists: that is how two runs never share a folder
                return candidate
            except FileExistsError:
                continue
        raise TagEditError(f"cannot create a new backup folder in {base}; clean up old backups there")

    def save(self, path: Path) -> None:
        """Copy `path` into the backup folder (once per file per run)."""
        path = Path(path)
        if path in self.saved or not path.exists():
            return
        if self.folder is None:
            self.folder = self._make_folder()
        try:
            relative = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            relative = Path(path.name)
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        self.saved.add(path)


# ---------------------------------------------------------------------------------------------- tags

def split_tags(text: str) -> list[str]:
    """Tags of a caption: split on commas (and line breaks), stripped, empty ones dropped."""
    return [tag.strip() for tag in re.split(r"[,\n]", text) if tag.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def read_tags(path: Path) -> list[str]:
    """Tags of caption file `path`; encoding problems become a TagEditError naming the file."""
    try:
        return split_tags(read_caption(Path(path)))
    except DatasetError as exc:
        raise TagEditError(str(exc)) from exc


def tag_key(tag: str) -> str:
    """Comparison key: "Red_Hair" and "red hair" are the same tag for excludes, appends and dedupe."""
    return " ".join(tag.replace("_", " ").split()).lower()


def dedupe(tags: list[str]) -> list[str]:
    """Tags in order, each kept at its first occurrence (compared with tag_key)."""
    seen: set[str] = set()
    kept = []
    for tag in tags:
        if tag_key(tag) not in seen:
            seen.add(tag_key(tag))
            kept.append(tag)
    return kept


def read_tag_list(path: Path) -> list[str]:
    """Tags listed in a UTF-8 text file: one per line or comma-separated; lines starting with # are comments."""
    path = Path(path)
    if not path.is_file():
        raise TagEditError(f"tag list {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TagEditError(f"tag list {path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return split_tags("\n".join(lines))


@dataclass(frozen=True)
class TagEdits:
    """Edits applied to every caption, in this order: replace → remove → keep only → dedupe → front.

    Plain mode matches whole tags exactly. With `regex`, `replace` patterns are substituted inside each tag
    (re.sub, so \\1 works) and `remove` patterns must match a whole tag (re.fullmatch). A replacement may
    hold commas ("1girl, solo") to become several tags; an empty result removes the tag. `front` tags are
    moved to the front in the given order, added where missing; they survive `keep_only`.
    """

    remove: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    regex: bool = False
    keep_only: tuple[str, ...] | None = None
    dedupe: bool = False
    front: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.regex:
            for pattern in [*self.remove, *(a for a, _ in self.replace)]:
                _compiled(pattern)

    def is_empty(self) -> bool:
        return not (self.remove or self.replace or self.keep_only is not None or self.dedupe or self.front)


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TagEditError(f"regular expression {pattern!r} is invalid: {exc}") from exc


def _replace(tags: list[str], old: str, new: str, regex: bool) -> list[str]:
    result = []
    for tag in tags:
        if regex:
            replaced = _compiled(old).sub(new, tag)
        else:
            replaced = new if tag == old.strip() else tag
        result.extend(split_tags(replaced) if replaced != tag else [tag])
    return result


def apply_edits(tags: list[str], edits: TagEdits) -> list[str]:
    """The tags after `edits` (see TagEdits for the order and matching rules)."""
    for old, new in edits.replace:
        tags = _replace(tags, old, new, edits.regex)
    for pattern in edits.remove:
        if edits.regex:
            tags = [t for t in tags if not _compiled(pattern).fullmatch(t)]
        else:
            tags = [t for t in tags if t != pattern.strip()]
    if edits.keep_only is not None:
        allowed = {tag_key(t) for t in edits.keep_only}
        tags = [t for t in tags if tag_key(t) in allowed]
    if edits.dedupe:
        tags = dedupe(tags)
    if edits.front:
        front_keys = {tag_key(t) for t in edits.front}
        tags = list(dict.fromkeys(t.strip() for t in edits.front)) + [t for t in tags if tag_key(t) not in front_keys]
    return tags


@dataclass(frozen=True)
class CaptionChange:
    path: Path
    old: list[str]
    new: list[str]

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self) -> str:
        """Unified diff with one tag per line, so moved, added and removed tags are easy to read."""
        lines = difflib.unified_diff(self.old, self.new, fromfile=str(self.path), tofile=f"{self.path} (edited)",
                                     lineterm="", n=1)
        return "\n".join(lines)


def plan_edits(caption_files: list[Path], edits: TagEdits) -> list[CaptionChange]:
    """What `edits` would do to each file (nothing is written). Unreadable files raise, all listed at once."""
    changes, problems = [], []
    for path in caption_files:
        try:
            old = read_tags(path)
        except TagEditError as exc:
            problems.append(str(exc))
            continue
        changes.append(CaptionChange(Path(path), old, apply_edits(old, edits)))
    if problems:
        raise TagEditError(f"{len(problems)} caption files cannot be read:\n" + "\n".join(problems))
    return changes


def apply_changes(changes: list[CaptionChange], backup: Backup) -> int:
    """Back up and atomically rewrite every changed caption; returns how many were written."""
    written = 0
    for change in changes:
        if not change.changed:
            continue
        backup.save(change.path)
        write_text_atomically(change.path, join_tags(change.new) + "\n")
        written += 1
    return written


# ---------------------------------------------------------------------------------------------- frequency

def tag_frequency(caption_files: list[Path]) -> Counter:
    """How many caption files contain each tag (a tag repeated within one file counts once)."""
    counts: Counter = Counter()
    for path in caption_files:
        counts.update(set(read_tags(path)))
    return counts


def frequency_lines(counts: Counter, num_files: int, top: int | None = None) -> list[str]:
    """A printable table: count, share of files and tag, most frequent first (ties alphabetical)."""
    rows = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = rows[:top] if top else rows
    width = len(str(rows[0][1])) if rows else 1
    lines = [f"{len(counts)} distinct tags in {num_files} caption files"]
    lines += [f"{count:>{width}}  {100 * count / max(num_files, 1):5.1f}%  {tag}" for tag, count in shown]
    if len(shown) < len(rows):
        lines.append(f"... and {len(rows) - len(shown)} more (use --top 0 to see all)")
    return lines
