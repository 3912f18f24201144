"""Automatic captions: the WD14 tagger (ONNX) and BLIP/GIT-style sentence captioners (transformers).

Both write `<stem><ext>` beside each image through `label_images`, which owns the write modes:
"skip" leaves non-empty captions alone, "overwrite" replaces them, "append" adds only new tags. A caption
that changes is backed up first (library.prep.tag_edit.Backup); nothing is ever deleted.

WD14 conventions (SmilingWolf's wd-v1-4 / wd-v3 taggers, as kohya's tag_images_by_wd14_tagger.py uses them):
the model folder holds `model.onnx` and `selected_tags.csv` (tag_id,name,category,count; category 9 = rating,
0 = general, 4 = character). Input is NHWC float32, BGR, 0..255, the image padded to a square with white and
resized to the model's input size (448). Output is one probability per CSV row.
"""
from __future__ import annotations

import csv
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image
from tqdm import tqdm

from library.errors import UserError
from library.data.images import load_image, to_rgb
from library.atomic import write_text_atomically
from library.prep.tag_edit import (
    Backup,
    TagEditError,
    TagEdits,
    apply_edits,
    caption_paths,
    dedupe,
    join_tags,
    normalise_extension,
    read_tags,
    tag_key,
)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9
DEFAULT_INPUT_SIZE = 448
WRITE_MODES = ("skip", "overwrite", "append")
# What Pillow raises for broken files (its plugins use SyntaxError/EOFError for bad data).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class TaggingError(UserError, ValueError):
    """A tagger/captioner problem; the message names the file or folder and the fix."""


def require_package(module: str, purpose: str, install: str) -> ModuleType:
    """Import an optional package, or raise one line saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TaggingError(f"{purpose} needs the '{module}' package, which is not installed "
                           f"({exc.__class__.__name__}): pip install {install}") from exc


# ---------------------------------------------------------------------------------------------- model files

def resolve_tagger_model(spec: str, cache_dir: Path | None = None) -> Path:
    """The folder holding model.onnx and selected_tags.csv for `spec`: a local folder, or a Hugging Face repo
    id ("SmilingWolf/wd-v1-4-convnext-tagger-v2") fetched once into the usual Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TaggingError(f"tagger model {path} is a file; pass the folder holding {MODEL_FILE} and {TAGS_FILE}")
        missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (path / name).is_file()]
        if missing:
            raise TaggingError(f"tagger model folder {path} lacks {' and '.join(missing)}; a WD14 tagger folder "
                               f"holds {MODEL_FILE} and {TAGS_FILE}")
        return path
    if not _REPO_ID.match(spec):
        raise TaggingError(f"tagger model {spec}: no such folder (and not a Hugging Face repo id like "
                           "SmilingWolf/wd-v1-4-convnext-tagger-v2)")
    files = [_hub_file(spec, name, cache_dir) for name in (MODEL_FILE, TAGS_FILE)]
    return files[0].parent


def _hub_file(repo_id: str, filename: str, cache_dir: Path | None) -> Path:
    hub = require_package("huggingface_hub", "downloading a tagger by repo id", "huggingface_hub")
    from huggingface_hub import errors

    try:
        # A cached copy never needs the network, so offline users with a filled cache just work.
        return Path(hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True))
    except errors.LocalEntryNotFoundError:
        pass
    try:
        return Path(hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError) as exc:
        raise TaggingError(
            f"cannot fetch {filename} of {repo_id}: offline and not in the Hugging Face cache. Run once while "
            f"online, or download {MODEL_FILE} and {TAGS_FILE} into a folder and pass that folder to --model"
        ) from exc
    except (errors.RepositoryNotFoundError, errors.EntryNotFoundError, errors.RevisionNotFoundError) as exc:
        raise TaggingError(f"{repo_id} has no file {filename} on the Hugging Face hub (check the repo id): "
                           f"{exc.__class__.__name__}") from exc
    except (errors.HfHubHTTPError, OSError) as exc:
        raise TaggingError(f"cannot download {filename} of {repo_id}: {exc}") from exc


@dataclass(frozen=True)
class TagTable:
    names: tuple[str, ...]
    categories: tuple[int, ...]


def read_tag_table(path: Path) -> TagTable:
    """Rows of a WD14 `selected_tags.csv` (needs name and category columns)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"name", "category"} <= set(reader.fieldnames):
                raise TaggingError(f"{path}: expected a header 'tag_id,name,category,count', got {reader.fieldnames}")
            names, categories = [], []
            for row in reader:
                try:
                    categories.append(int(row["category"]))
                except (TypeError, ValueError) as exc:
                    raise TaggingError(f"{path} line {reader.line_num}: category {row['category']!r} is not a "
                                       "number") from exc
                names.append(row["name"])
    except UnicodeDecodeError as exc:
        raise TaggingError(f"{path} is not UTF-8 text: {exc}") from exc
    if not names:
        raise TaggingError(f"{path} lists no tags")
    return TagTable(tuple(names), tuple(categories))


# ---------------------------------------------------------------------------------------------- WD14 tagger

def wd14_input(img: Image.Image, size: int) -> np.ndarray:
    """[size, size, 3] float32 BGR 0..255: `img` centred on a white square, then resized (area when shrinking,
    Lanczos when enlarging, as kohya's tagger script does)."""
    img = to_rgb(img)
    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    if side != size:
        resample = Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS
        square = square.resize((size, size), resample)
    return np.ascontiguousarray(np.asarray(square, dtype=np.float32)[:, :, ::-1])


@dataclass(frozen=True)
class TagOptions:
    """How probabilities become a tag list: thresholds, rating tag, underscores, excludes."""

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    rating: bool = False
    underscores_to_spaces: bool = True
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise TaggingError(f"{name.replace('_', '-')} must be between 0 and 1, got {value}")


def _display(name: str, options: TagOptions) -> str:
    # Short names such as "^_^" or "o_o" are emoticons whose underscore is part of the tag.
    return name.replace("_", " ") if options.underscores_to_spaces and len(name) > 3 else name


def select_tags(probs: np.ndarray, table: TagTable, options: TagOptions) -> list[str]:
    """Tags for one image: the rating (argmax, when enabled), then character tags and general
    tags above their thresholds, each group most probable first; excluded tags dropped, duplicates removed."""
    categories = np.asarray(table.categories)
    groups: list[list[str]] = []
    if options.rating and (categories == RATING).any():
        ratings = np.flatnonzero(categories == RATING)
        groups.append([table.names[ratings[np.argmax(probs[ratings])]]])
    for category, threshold in ((CHARACTER, options.character_threshold), (GENERAL, options.general_threshold)):
        chosen = np.flatnonzero((categories == category) & (probs >= threshold))
        chosen = chosen[np.argsort(-probs[chosen], kind="stable")]
        groups.append([table.names[i] for i in chosen])
    excluded = {tag_key(t) for t in options.exclude}
    found = [_display(name, options) for group in groups for name in group]
    found = [t for t in found if tag_key(t) not in excluded]
    return dedupe(found)


class WD14Tagger:
    """A WD14 ONNX tagger loaded from a folder with model.onnx and selected_tags.csv."""

    def __init__(self, model_dir: Path):
        ort = require_package("onnxruntime", "the WD14 tagger", "onnxruntime (onnxruntime-gpu on CUDA machines)")
        model_dir = Path(model_dir)
        self.table = read_tag_table(model_dir / TAGS_FILE)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=providers or None)
        except Exception as exc:
            raise TaggingError(f"cannot load {model_dir / MODEL_FILE}: {exc}") from exc
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or (inp.shape[3] != 3 and isinstance(inp.shape[3], int)):
            raise TaggingError(f"{model_dir / MODEL_FILE}: input {inp.name} has shape {inp.shape}; a WD14 tagger "
                               "takes NHWC images [batch, height, width, 3]")
        self.input_name = inp.name
        self.input_size = inp.shape[1] if isinstance(inp.shape[1], int) else DEFAULT_INPUT_SIZE
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.table.names):
            raise TaggingError(f"{model_dir}: the model outputs {width} scores but {TAGS_FILE} lists "
                               f"{len(self.table.names)} tags; the two files come from different taggers")

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """[len(images), num_tags] probabilities."""
        batch = np.stack([wd14_input(img, self.input_size) for img in images])
        chunk = self.fixed_batch or len(batch)
        outputs = []
        for start in range(0, len(batch), chunk):
            part = batch[start:start + chunk]
            if self.fixed_batch and len(part) < chunk:  # a fixed-batch export needs full batches
                part = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), np.float32)])
            outputs.append(self.session.run(None, {self.input_name: part})[0][:len(batch) - start])
        return np.concatenate(outputs)[:, :len(self.table.names)]

    def labeller(self, options: TagOptions) -> Callable[[list[Image.Image]], list[list[str]]]:
        """A function from a batch of images to their tag lists, for `label_images`."""
        return lambda images: [select_tags(row, self.table, options) for row in self.probabilities(images)]


# ---------------------------------------------------------------------------------------------- captioner

class Captioner:
    """Sentence captions from a local BLIP/GIT-style transformers folder (AutoProcessor + image-to-text model)."""

    def __init__(self, model_dir: Path, max_new_tokens: int = 40, num_beams: int = 3, prompt: str = "",
                 device: str | None = None):
        transformers = require_package("transformers", "the captioner", "transformers")
        torch = require_package("torch", "the captioner", "torch")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise TaggingError(f"caption model {model_dir} is not a local transformers model folder (no config.json); "
                               "download a BLIP or GIT captioning model folder and pass its path")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
            self.model = _load_caption_model(transformers, model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise TaggingError(f"cannot load the caption model in {model_dir}: {exc}") from exc
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.torch = torch
        self.max_new_tokens, self.num_beams, self.prompt = max_new_tokens, num_beams, prompt.strip()

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One sentence per image (the prompt, if any, is not repeated in the result)."""
        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=[to_rgb(img) for img in images], return_tensors="pt", **kwargs)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with self.torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [_strip_prompt(text, self.prompt) for text in texts]

    def labeller(self) -> Callable[[list[Image.Image]], list[list[str]]]:
        """A function from a batch of images to one-sentence lists, for `label_images`."""
        return lambda images: [[text] if text else [] for text in self.caption(images)]


def _load_caption_model(transformers: ModuleType, model_dir: Path):
    # transformers 5 folds AutoModelForVision2Seq into AutoModelForImageTextToText (which also maps GIT).
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(model_dir, local_files_only=True)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
    raise TaggingError(f"{model_dir}: transformers has no image-to-text model class for this config; "
                       "use a BLIP or GIT captioning model")


def _strip_prompt(text: str, prompt: str) -> str:
    text = text.strip()
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):].strip()
    return text


# ---------------------------------------------------------------------------------------------- writing

@dataclass
class LabelReport:
    written: list[Path] = field(default_factory=list)  # new captions, or overwritten ones
    appended: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # caption existed (mode "skip")
    failed: list[tuple[Path, str]] = field(default_factory=list)
    backup_dir: Path | None = None

    def summary_lines(self) -> list[str]:
        hint = " (caption exists; use --mode overwrite or append)" if self.skipped else ""
        lines = [(f"{len(self.written)} captions written, {len(self.appended)} appended to, {len(self.unchanged)} "
                  f"unchanged, {len(self.skipped)} skipped{hint}, {len(self.failed)} failed")]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failed]
        if self.backup_dir:
            lines.append(f"previous captions backed up to {self.backup_dir}")
        return lines


def label_images(images: list[Path], labeller: Callable[[list[Image.Image]], list[list[str]]], root: Path,
                 mode: str = "skip", caption_ext: str = ".txt", batch_size: int = 8, trigger: tuple[str, ...] = (),
                 progress: bool = True) -> LabelReport:
    """Run `labeller` over `images` in batches and write each caption file according to `mode`.

    `trigger` tags always come first in every caption written (appended captions included).

    Images that cannot be read, and captions that cannot be decoded, are reported in `failed` and left alone.
    Backups of changed captions go to a new folder under `root` (see tag_edit.Backup).
    """
    if mode not in WRITE_MODES:
        raise TaggingError(f"write mode {mode!r} is not one of {', '.join(WRITE_MODES)}")
    if batch_size < 1:
        raise TaggingError(f"batch size must be at least 1, got {batch_size}")
    report, backup = LabelReport(), Backup(root)
    targets = caption_paths(images, normalise_extension(caption_ext))
    queue: list[tuple[Path, Path, list[str]]] = []  # (image, caption file, existing tags)
    owners: dict[Path, Path] = {}
    for image in images:
        owner = owners.setdefault(targets[image], image)
        if owner != image:
            reason = f"shares the caption file {targets[image].name} with {owner.name}; rename one of them"
            report.failed.append((image, reason))
            continue
        try:
            existing = read_tags(targets[image]) if targets[image].is_file() else []
        except TagEditError as exc:
            report.failed.append((image, str(exc)))
            continue
        if mode == "skip" and existing:
            report.skipped.append(image)
        else:
            queue.append((image, targets[image], existing))
    with tqdm(total=len(queue), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(queue), batch_size):
            batch = queue[start:start + batch_size]
            _label_batch(batch, labeller, mode, trigger, report, backup)
            bar.update(len(batch))
    report.backup_dir = backup.folder
    return report


def _label_batch(batch: list[tuple[Path, Path, list[str]]], labeller, mode: str, trigger: tuple[str, ...],
                 report: LabelReport, backup: Backup) -> None:
    loaded, pixels = [], []
    for entry in batch:
        try:
            pixels.append(load_image(entry[0]))
            loaded.append(entry)
        except IMAGE_ERRORS as exc:
            report.failed.append((entry[0], f"cannot read image: {exc}"))
    if not loaded:
        return
    for (image, target, existing), tags in zip(loaded, labeller(pixels)):
        if not tags and not trigger:
            report.failed.append((image, "nothing came out for it (tagger: lower --general-threshold)"))
            continue
        known = {tag_key(t) for t in existing}
        new = existing + [t for t in tags if tag_key(t) not in known] if mode == "append" else tags
        new = apply_edits(new, TagEdits(front=trigger)) if trigger else new
        if new == existing:
            report.unchanged.append(image)
            continue
        if existing:
            backup.save(target)
        write_text_atomically(target, join_tags(new) + "\n")
        (report.appended if mode == "append" and existing else report.written).append(image)
