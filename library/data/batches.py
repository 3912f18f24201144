"""Batches of an epoch: a seeded shuffled order that never mixes training sizes, per-sample captions and
flips, and each item's pixels at its training size.

Every random choice is derived from (seed, epoch, position) instead of a running RNG, so a resumed run sees
exactly the data an uninterrupted run would have seen, without saving any RNG state.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from library.data.buckets import Size, upright_size
from library.data.captions import CaptionOptions, process_caption
from library.data.folders import ImageItem, expand_samples
from library.data.images import CropBox, cover_crop, load_image, resize_and_crop, to_tensor


def derived_rng(*parts: int) -> random.Random:
    """A Python RNG seeded from a tuple of ints (stable across runs and platforms)."""
    return random.Random(hash_ints(*parts))


def hash_ints(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return value >> 1


@dataclass(frozen=True)
class SampleGeometry:
    """How a sample's training pixels were cut from its image: the image's upright size on disk, the cover
    resize and crop (`CropBox`), the training size and whether the sample is mirrored. SDXL is conditioned on
    these (its size and crop "time ids"); other families ignore them."""

    original_size: Size  # (width, height) of the image file, EXIF rotation applied
    box: CropBox
    target_size: Size  # (width, height) trained at: the bucket, or resolution²
    flip: bool = False

    @property
    def crop_top(self) -> int:
        return self.box.top

    @property
    def crop_left(self) -> int:
        """The crop's left edge in the image as trained: for a mirrored sample, measured in the mirrored
        resized image (diffusers' SDXL scripts take the crop after the flip)."""
        if self.flip:
            return self.box.resized_width - self.box.left - self.target_size[0]
        return self.box.left


@dataclass(frozen=True)
class Batch:
    items: list[ImageItem]
    item_indices: list[int]
    captions: list[str]
    flips: list[bool]
    loss_weight: torch.Tensor | None = None  # per-pixel loss weights [B, 1, h, w] at latent resolution
    geometry: list[SampleGeometry] = field(default_factory=list)  # per sample (batches of TrainingData)
    sample_weights: tuple[float, ...] | None = None  # per-sample loss weights (their folders' loss_weight)

    @property
    def is_reg(self) -> torch.Tensor:
        return torch.tensor([item.is_reg for item in self.items])

    def rows(self, rows: slice) -> "Batch":
        """The samples at `rows` (a data-parallel process's share), each exactly as in the whole batch."""
        if rows == slice(0, len(self.items)):
            return self
        weights = self.sample_weights
        return Batch(self.items[rows], self.item_indices[rows], self.captions[rows], self.flips[rows],
                     None if self.loss_weight is None else self.loss_weight[rows], self.geometry[rows],
                     None if weights is None else weights[rows])


@dataclass(frozen=True)
class SubsetData:
    """What a folder sets for its own images: caption options and the loss weight of each of its samples."""

    captions: CaptionOptions
    loss_weight: float = 1.0


class TrainingData:
    """Items (training + balanced regularisation) → batches of one epoch, in a seeded shuffled order."""

    def __init__(self, items: list[ImageItem], captions: CaptionOptions, resolution: int, batch_size: int,
                 seed: int, flip_aug: bool = False, random_crop: bool = False,
                 sizes: list[tuple[int, int]] | None = None, image_sizes: list[Size] | None = None,
                 subsets: dict[int, SubsetData] | None = None, color_aug: bool = False,
                 face_crop_range: tuple[float, float] | None = None):
        """`sizes`: each item's bucket (width, height); None trains every item at resolution².
        `image_sizes`: each item's upright (width, height) when already known (buckets read them); otherwise
        read from the file headers when first needed. `subsets`: per subset index, settings that differ from
        `captions` and weight 1. color_aug / face_crop_range: sd-scripts' pixel augmentations
        (library/data/augment.py), for latents encoded every step."""
        if sizes is not None and len(sizes) != len(items):
            raise ValueError(f"{len(sizes)} bucket sizes for {len(items)} items")
        self.items = items
        self.caption_options = captions
        self.resolution = resolution
        self.batch_size = batch_size
        self.seed = seed
        self.flip_aug = flip_aug
        self.random_crop = random_crop
        self.sizes = sizes
        self.subsets = subsets or {}
        self.color_aug = color_aug
        self.face_crop_range = face_crop_range
        self.samples = expand_samples(items)
        self._image_sizes: dict[int, Size] = dict(enumerate(image_sizes)) if image_sizes is not None else {}

    def subset_of(self, item_index: int) -> SubsetData:
        return self.subsets.get(self.items[item_index].subset_index) or SubsetData(self.caption_options)

    def size_of(self, item_index: int) -> tuple[int, int]:
        """Training (width, height) of an item: its aspect-ratio bucket, or resolution² without buckets."""
        if self.sizes is not None:
            return self.sizes[item_index]
        return self.resolution, self.resolution

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Sample positions grouped into batches for `epoch`; a batch never mixes training sizes.

        Every epoch has the same number of batches (per size: ceil(samples / batch size)), so the step plan
        holds; the batch order is shuffled again so the partial batches of each bucket are not all last."""
        order = list(range(len(self.samples)))
        derived_rng(self.seed, epoch, 1).shuffle(order)
        by_size: dict[tuple[int, int], list[int]] = {}
        batches = []
        for position in order:
            group = by_size.setdefault(self.size_of(self.samples[position]), [])
            group.append(position)
            if len(group) == self.batch_size:
                batches.append(group.copy())
                group.clear()
        batches.extend(group for group in by_size.values() if group)
        derived_rng(self.seed, epoch, 5).shuffle(batches)
        return batches

    def image_size(self, item_index: int) -> Size:
        """The item's upright (width, height) on disk (read from the header once)."""
        if item_index not in self._image_sizes:
            self._image_sizes[item_index] = upright_size(self.items[item_index].path)
        return self._image_sizes[item_index]

    def geometry(self, item_index: int, flip: bool, rng: random.Random | None = None) -> SampleGeometry:
        """How the item is cut to its training size: centred, or at an offset drawn from `rng` with random_crop."""
        width, height = self.size_of(item_index)
        original = self.image_size(item_index)
        box = cover_crop(*original, width, height, random_crop=self.random_crop, rng=rng)
        return SampleGeometry(original, box, (width, height), flip)

    def batch(self, epoch: int, positions: list[int], step_seed: int | None = None) -> Batch:
        """The samples at `positions` of `epoch`: captions and flips from (seed, epoch, position); random crops
        from the step's seed (the trainer passes its own; by default one derived from the batch's positions)."""
        indices = [self.samples[p] for p in positions]
        captions, flips = [], []
        for position, index in zip(positions, indices):
            rng = derived_rng(self.seed, epoch, position, 2)
            captions.append(process_caption(self.items[index].caption, self.subset_of(index).captions, rng))
            flips.append(self.flip_aug and rng.random() < 0.5)
        if step_seed is None:
            step_seed = hash_ints(self.seed, epoch, *positions)
        crop_rng = derived_rng(step_seed, 4)  # one stream for the batch, drawn in sample order
        geometry = [self.geometry(index, flip, crop_rng) for index, flip in zip(indices, flips)]
        weights = tuple(self.subset_of(i).loss_weight for i in indices)
        return Batch([self.items[i] for i in indices], indices, captions, flips, geometry=geometry,
                     sample_weights=weights if any(w != 1.0 for w in weights) else None)

    def pixels(self, item_index: int, flip: bool, box: CropBox | None = None,
               rng: random.Random | None = None) -> torch.Tensor:
        """The item's image at its training size as a [3, H, W] tensor in [-1, 1], cut as `box` says (a
        sample's geometry) or centred; `rng` draws the pixel augmentations (the step's stream)."""
        width, height = self.size_of(item_index)
        path = self.items[item_index].path
        image = load_image(path)
        face = None
        if self.face_crop_range is not None:
            from library.data.augment import face_info  # only runs with the augmentation import it

            face = face_info(path)
        if face is not None:  # a crop around the face replaces the sample's (SDXL's crop ids keep the cover crop)
            from library.data.augment import face_crop

            image = face_crop(image, face, width, height, self.face_crop_range, self.random_crop, rng or random)
        else:
            image = resize_and_crop(image, width, height, box=box)
        if self.color_aug:
            from library.data.augment import color_aug

            image = color_aug(image, rng or random)
        tensor = to_tensor(image)
        return tensor.flip(-1) if flip else tensor
