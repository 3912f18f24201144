"""What the loop eats: per-epoch batch order, per-sample captions and flips, latents (cached or encoded) and
text conditioning (optionally cached).

Every random choice is derived from (seed, epoch, position) instead of a running RNG, so a resumed run sees
exactly the data an uninterrupted run would have seen, without saving any RNG state.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from library.models.conditioning import encode_text, tokenize
from library.data.folders import CaptionOptions, ImageItem, expand_samples, process_caption
from library.data.images import load_image, resize_and_crop, to_tensor
from library.data.latent_cache import DiskLatentCache, LatentEntry, encode_distribution, encode_entries, sample_latent


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
                 seed: int, flip_aug: bool = False, random_crop: bool = False,
                 sizes: list[tuple[int, int]] | None = None, cache_dir: Path | None = None,
                 vae_batch_size: int = 1):
        """`sizes`: each item's bucket (width, height); None trains every item at resolution².
        `cache_dir`: where the disk latent cache lives (dataset.cache_latents = "disk"); None otherwise."""
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
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.vae_batch_size = vae_batch_size
        self.samples = expand_samples(items)

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
    mean, std = encode_distribution(vae, pixels)
    noise = torch.randn(mean.shape, generator=generator)
    return ((mean + std * noise) * vae.config.scaling_factor).float()


LatentKey = tuple[int, bool]  # (item index, flipped)


class LatentSource:
    """Latents for a batch: from a cache filled once before training, or encoded every step.

    Caches: "memory" (encoded every run, held in RAM) or "disk" (files keyed on image content and settings,
    shared by every run and by prepare_buckets.py; see library/latent_cache.py). Both store one sample per
    (item, flip) drawn with a seed derived from (seed, item, flip), so the two give the same latents and a
    resumed run sees exactly what an uninterrupted one would. The disk cache is used when the data carries a
    cache_dir (set by run.build_data for dataset.cache_latents = "disk").
    """

    def __init__(self, data: TrainingData, vae, cache: bool | str, seed: int):
        self.data = data
        self.vae = vae
        self.seed = seed
        self.mode = _latent_mode(cache, data.cache_dir)
        self.cache: dict[LatentKey, torch.Tensor] | None = {} if self.mode == "memory" else None
        self.disk: DiskLatentCache | None = None
        self.files: dict[LatentKey, tuple[Path, str, LatentEntry]] = {}

    def keys(self) -> list[LatentKey]:
        """Every (item, flip) the epochs can ask for."""
        flips = (False, True) if self.data.flip_aug else (False,)
        return [(i, f) for i in range(len(self.data.items)) for f in flips]

    def entry(self, key: LatentKey) -> LatentEntry:
        width, height = self.data.size_of(key[0])
        return LatentEntry(self.data.items[key[0]].path, width, height, key[1])

    def fill(self) -> None:
        """Encode (memory) or find and complete (disk) every latent the epochs can ask for, once."""
        if self.mode == "off":
            return
        keys = self.keys()
        entries = [self.entry(k) for k in keys]
        if self.mode == "memory":
            for k, _, mean, std in encode_entries(entries, self.vae, self.data.vae_batch_size, desc="caching latents"):
                self.cache[keys[k]] = self._sample(keys[k], mean, std)
            return
        assert self.data.cache_dir is not None
        self.disk = DiskLatentCache(self.data.cache_dir, self.vae)
        report, digests = self.disk.ensure(entries, self.data.vae_batch_size)
        print(report.summary(self.data.cache_dir))
        self.files = {k: (path, digest, entry) for k, path, digest, entry in zip(keys, report.files, digests, entries)}

    def distribution(self, key: LatentKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of one (item, flip) from the disk cache, for trainers that sample their own way
        (textual inversion's A1111 sampling methods). Only the disk cache keeps distributions."""
        if self.disk is None:
            raise RuntimeError("LatentSource.distribution needs the filled disk cache (dataset.cache_latents = 'disk')")
        return self.disk.load(*self.files[key])

    def _sample(self, key: LatentKey, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        seed = hash_ints(self.seed, key[0], int(key[1]), 3)
        return sample_latent(mean, std, seed, self.vae.config.scaling_factor)

    def latents(self, batch: Batch, epoch: int, step_seed: int) -> torch.Tensor:
        keys = list(zip(batch.item_indices, batch.flips))
        if self.cache is not None:
            return torch.stack([self.cache[k] for k in keys])
        if self.disk is not None:
            return torch.stack([self._sample(k, *self.distribution(k)) for k in keys])
        rng = derived_rng(step_seed, 4)
        pixels = torch.stack([self.data.pixels(i, f, rng) for i, f in keys])
        return encode_latents(self.vae, pixels, torch.Generator().manual_seed(step_seed))


def _latent_mode(cache: bool | str, cache_dir: Path | None) -> str:
    if cache_dir is not None:
        return "disk"
    if cache in (True, "memory"):
        return "memory"
    if cache in (False, "off"):
        return "off"
    raise ValueError(f"latent cache {cache!r} needs a cache folder: build the data with run.build_data")


class ConditioningSource:
    """Text-encoder hidden states for a batch's captions. With `cache`, each distinct caption is encoded once
    and kept (on the CPU): valid only while the text encoder is frozen and captions never vary, which the
    config checks (dataset.cache_text_encoder_outputs) and this class re-checks for the run's trainable."""

    def __init__(self, tokenizer, text_encoder, clip_skip: int = 1, cache: bool = False,
                 trains_text_encoder: bool = False):
        if cache and trains_text_encoder:
            raise ValueError("dataset.cache_text_encoder_outputs = true, but this run trains the text encoder "
                             "(LoRA: network.train_text_encoder; textual inversion always does), so its outputs "
                             "change every step: set dataset.cache_text_encoder_outputs = false")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None

    def encode(self, captions: list[str], grad: bool = False) -> torch.Tensor:
        """[B, 77, dim] hidden states on the text encoder's device."""
        if self.cache is None:
            with torch.set_grad_enabled(grad):
                return encode_text(self.text_encoder, tokenize(self.tokenizer, captions), self.clip_skip)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            with torch.no_grad():
                states = encode_text(self.text_encoder, tokenize(self.tokenizer, missing), self.clip_skip)
            self.cache.update((c, s.detach().cpu()) for c, s in zip(missing, states))
        return torch.stack([self.cache[c] for c in captions]).to(self.text_encoder.device)


def text_encoder_cache_problem(config) -> str | None:
    """dataset.cache_text_encoder_outputs is only valid with a frozen text encoder (checked across sections)."""
    network = getattr(config, "network", None)
    if config.dataset.cache_text_encoder_outputs and getattr(network, "train_text_encoder", False):
        return ("dataset.cache_text_encoder_outputs = true, but network.train_text_encoder = true changes the "
                "text encoder's outputs every step: set network.train_text_encoder = false to cache them, or "
                "dataset.cache_text_encoder_outputs = false")
    return None
