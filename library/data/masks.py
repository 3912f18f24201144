"""Loss masks (sd-scripts' --masked_loss with conditioning_data_dir, and alpha_mask): a grey image per training
image, white = train, black = ignore, grey in between, that weighs the loss per latent pixel.

Where a mask comes from (per folder, see library/config/options.py subset_mask_mode):
- mask files: `<stem>.mask.png` (any image extension) beside the image, or `<mask_dir>/<stem>.<ext>` for a
  subset's mask_dir, or `<dataset.mask_dir>/<the image's NN_name folder>/<stem>.<ext>`; the red channel is the
  mask (a grey image reads the same), and it must have the image's size (as sd-scripts asserts);
- the image's own alpha channel (images without transparency weigh 1 everywhere).

A mask goes through exactly the image's geometry — the same cover resize and crop to its bucket, the same flip
— and is then averaged down to latent resolution (area, as sd-scripts' F.interpolate(mode="area")). The loss is
not renormalised by the mask's area (sd-scripts does not either).

Masks are computed once per (image, flip) and kept in memory, or with dataset.cache_latents = "disk" stored in
the cache folder beside the latents, addressed by the mask's own bytes (or the image's, for alpha masks) and its
geometry, so an edited mask is never served stale.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.batches import Batch, TrainingData
from library.data.images import IMAGE_EXTENSIONS, _open_decoded, load_alpha, resize_and_crop, to_rgb

MASK_FORMAT = "kiln-mask-1"  # bump when the pixels → mask recipe changes
MASK_INFIX = ".mask"
FILE, ALPHA = "file", "alpha"


@dataclass(frozen=True)
class MaskSpec:
    """One image's mask: from a mask file or from the image's alpha channel."""

    source: str  # FILE or ALPHA
    path: Path  # the mask file (FILE) or the image (ALPHA)


def _first_existing(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def mask_file_for(image: Path, mask_dir: Path | None) -> Path | None:
    """The mask file of `image`: in `mask_dir` under the image's stem, else `<stem>.mask.<ext>` beside it."""
    if mask_dir is not None:
        return _first_existing(mask_dir, image.stem)
    return _first_existing(image.parent, image.stem + MASK_INFIX)


def expected_mask_path(image: Path, mask_dir: Path | None) -> Path:
    """Where a missing mask is looked for first (for messages)."""
    return (mask_dir / f"{image.stem}.png") if mask_dir is not None else image.with_name(image.stem + ".mask.png")


def _size(path: Path) -> tuple[int, int] | None:
    """(width, height) as load_image shows it (EXIF rotation applied), from the header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            return (height, width) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (width, height)
    except (OSError, ValueError):
        return None


def mask_specs(images: list[Path], modes: list[str | None], mask_dirs: list[Path | None]
               ) -> tuple[list[MaskSpec | None], list[str]]:
    """Each image's MaskSpec (None: no mask) and the problems: mask files missing, unreadable or of another
    size than their image, listed together (at most 10 each, then a count)."""
    specs: list[MaskSpec | None] = []
    missing, wrong = [], []
    for image, mode, mask_dir in zip(images, modes, mask_dirs):
        if mode == ALPHA:
            specs.append(MaskSpec(ALPHA, image))
            continue
        if mode != FILE:
            specs.append(None)
            continue
        found = mask_file_for(image, mask_dir)
        specs.append(MaskSpec(FILE, found) if found else None)
        if found is None:
            missing.append(f"  {image} (expected {expected_mask_path(image, mask_dir)})")
            continue
        mask_size, image_size = _size(found), _size(image)
        if mask_size is None:
            wrong.append(f"  {found}: cannot be read as an image")
        elif mask_size != image_size:
            wrong.append(f"  {found}: {mask_size[0]}x{mask_size[1]}, its image {image} is "
                         f"{image_size[0]}x{image_size[1]}" if image_size else f"  {found}: its image is unreadable")
    problems = []
    if missing:
        problems.append(f"{len(missing)} image(s) have no loss mask (dataset.masked_loss):\n" + _listed(missing))
    if wrong:
        problems.append(f"{len(wrong)} loss mask(s) are unreadable or not the size of their image (a mask must "
                        "match its image pixel for pixel):\n" + _listed(wrong))
    return specs, problems


def _listed(lines: list[str], limit: int = 10) -> str:
    return "\n".join(lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []))


def _mask_image(spec: MaskSpec) -> Image.Image | None:
    """The mask as an "L" image at the source image's size; None for an image without alpha (weight 1)."""
    if spec.source == ALPHA:
        return load_alpha(spec.path)
    return to_rgb(_open_decoded(spec.path)).getchannel("R")


def compute_mask(spec: MaskSpec, width: int, height: int, flip: bool, factor: int) -> torch.Tensor:
    """[1, height/factor, width/factor] in [0, 1]: the mask cropped and flipped as its image, area-averaged."""
    size = (width // factor, height // factor)
    mask = _mask_image(spec)
    if mask is None:
        return torch.ones(1, size[1], size[0])
    mask = resize_and_crop(mask, width, height)  # the image's own resize and crop
    mask = ImageOps.mirror(mask) if flip else mask
    values = np.asarray(mask.resize(size, Image.Resampling.BOX), dtype=np.float32) / 255.0
    return torch.from_numpy(values.copy()).unsqueeze(0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class MaskSource:
    """Loss weights [B, 1, h, w] for a batch from the items' masks, each computed once per (item, flip): in
    memory, or with `cache_dir` also in `<cache_dir>/masks/`, keyed by content and geometry."""

    def __init__(self, data: TrainingData, specs: list[MaskSpec | None], factor: int, cache_dir: Path | None = None):
        if len(specs) != len(data.items):
            raise ValueError(f"{len(specs)} mask specs for {len(data.items)} items")
        self.data = data
        self.specs = specs
        self.factor = factor
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory: dict[tuple[int, bool], torch.Tensor] = {}

    def fill(self) -> None:
        """Compute (or read from the disk cache) every mask the epochs can ask for."""
        flips = (False, True) if self.data.flip_aug else (False,)
        for index, spec in enumerate(self.specs):
            for flip in flips if spec is not None else ():
                self.mask(index, flip)

    def mask(self, index: int, flip: bool) -> torch.Tensor:
        key = (index, flip)
        if key not in self.memory:
            spec, (width, height) = self.specs[index], self.data.size_of(index)
            if spec is None:
                self.memory[key] = torch.ones(1, height // self.factor, width // self.factor)
            elif self.cache_dir is None:
                self.memory[key] = compute_mask(spec, width, height, flip, self.factor)
            else:
                self.memory[key] = self._cached(spec, width, height, flip)
        return self.memory[key]

    def weights(self, batch: Batch) -> torch.Tensor | None:
        """The batch's mask weights, or None when none of its images has a mask."""
        if all(self.specs[i] is None for i in batch.item_indices):
            return None
        return torch.stack([self.mask(i, f) for i, f in zip(batch.item_indices, batch.flips)])

    def _cached(self, spec: MaskSpec, width: int, height: int, flip: bool) -> torch.Tensor:
        from safetensors import safe_open

        from library.training.checkpoints import atomic_save_safetensors

        fields = {"format": MASK_FORMAT, "source": spec.source, "sha256": _digest(spec.path), "width": str(width),
                  "height": str(height), "flip": str(int(flip)), "factor": str(self.factor)}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]
        path = self.cache_dir / "masks" / key[:2] / f"{key}.safetensors"
        shape = (1, height // self.factor, width // self.factor)
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata() or {}
                    mask = handle.get_tensor("mask")
                if all(metadata.get(k) == v for k, v in fields.items()) and tuple(mask.shape) == shape:
                    return mask
            except Exception:  # noqa: BLE001 - a damaged file is rebuilt below, like a damaged latent
                pass
            print(f"mask cache: {path} is damaged or for other settings; rebuilding it")
        mask = compute_mask(spec, width, height, flip, self.factor)
        atomic_save_safetensors({"mask": mask}, path, {**fields, "mask_source": str(spec.path)})
        return mask
