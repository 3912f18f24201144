"""What the loop eats: per-epoch batch order, per-sample captions and flips, and latents (cached or encoded).

Every random choice is derived from (seed, epoch, position) instead of a running RNG, so a resumed run sees
exactly the data an uninterrupted run would have seen, without saving any RNG state.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from library.dataset import CaptionOptions, ImageItem, expand_samples, process_caption
from library.images import load_image, resize_and_crop, to_tensor


def derived_rng(*parts: int) -> random.Random:
    """A Python RNG seeded from a tuple of ints (stable across runs and platforms)."""
    return random.Random(hash_ints(*parts))


def hash_ints(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return value >> 1


@dataclass(frozen=True)
class Batch:
    items: list[ImageItem]
    item_indices: list[int]
    captions: list[str]
    flips: list[bool]

    @property
    def is_reg(self) -> torch.Tensor:
        return torch.tensor([item.is_reg for item in self.items])


class TrainingData:
    """Items (training + balanced regularisation) → batches of one epoch, in a seeded shuffled order."""

    def __init__(self, items: list[ImageItem], captions: CaptionOptions, resolution: int, batch_size: int,
                 seed: int, flip_aug: bool = False, random_crop: bool = False):
        self.items = items
        self.caption_options = captions
        self.resolution = resolution
        self.batch_size = batch_size
        self.seed = seed
        self.flip_aug = flip_aug
        self.random_crop = random_crop
        self.samples = expand_samples(items)

    def size_of(self, item_index: int) -> tuple[int, int]:
        """Training (width, height) of an item. One square size for now; buckets will vary it per item."""
        return self.resolution, self.resolution

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Sample positions grouped into batches for `epoch`; a batch never mixes training sizes."""
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
        return batches

    def batch(self, epoch: int, positions: list[int]) -> Batch:
        indices = [self.samples[p] for p in positions]
        captions, flips = [], []
        for position, index in zip(positions, indices):
            rng = derived_rng(self.seed, epoch, position, 2)
            captions.append(process_caption(self.items[index].caption, self.caption_options, rng))
            flips.append(self.flip_aug and rng.random() < 0.5)
        return Batch([self.items[i] for i in indices], indices, captions, flips)

    def pixels(self, item_index: int, flip: bool, rng: random.Random | None = None) -> torch.Tensor:
        """The item's image at its training size as a [3, H, W] tensor in [-1, 1]."""
        width, height = self.size_of(item_index)
        image = resize_and_crop(load_image(self.items[item_index].path), width, height,
                                random_crop=self.random_crop, rng=rng)
        tensor = to_tensor(image)
        return tensor.flip(-1) if flip else tensor


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE-encode a [B, 3, H, W] batch and sample scaled latents (fp32 on the CPU)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device, dist.mean.dtype)
    latents = dist.mean + dist.std * noise
    return (latents * vae.config.scaling_factor).float().cpu()


class LatentSource:
    """Latents for a batch: from an in-memory cache filled once before training, or encoded every step."""

    def __init__(self, data: TrainingData, vae, cache: bool, seed: int):
        self.data = data
        self.vae = vae
        self.seed = seed
        self.cache: dict[tuple[int, bool], torch.Tensor] | None = {} if cache else None

    def fill(self) -> None:
        """Encode every (item, flip) the epochs can ask for, once, with a progress bar."""
        if self.cache is None:
            return
        flips = (False, True) if self.data.flip_aug else (False,)
        keys = [(i, f) for i in range(len(self.data.items)) for f in flips]
        for index, flip in tqdm(keys, desc="caching latents", unit="img", leave=False):
            generator = torch.Generator().manual_seed(hash_ints(self.seed, index, int(flip), 3))
            pixels = self.data.pixels(index, flip).unsqueeze(0)
            self.cache[(index, flip)] = encode_latents(self.vae, pixels, generator)[0]

    def latents(self, batch: Batch, epoch: int, step_seed: int) -> torch.Tensor:
        if self.cache is not None:
            return torch.stack([self.cache[(i, f)] for i, f in zip(batch.item_indices, batch.flips)])
        rng = derived_rng(step_seed, 4)
        pixels = torch.stack([self.data.pixels(i, f, rng) for i, f in zip(batch.item_indices, batch.flips)])
        return encode_latents(self.vae, pixels, torch.Generator().manual_seed(step_seed))
