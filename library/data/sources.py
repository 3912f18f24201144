"""What the loop reads each step besides the batch itself: latents (cached or encoded, drawn from the VAE's
distribution in one of four ways) and the text encoders' output (optionally cached per caption)."""
from __future__ import annotations

from pathlib import Path

import torch

from library.data.batches import Batch, TrainingData, derived_rng, hash_ints
from library.data.latent_cache import DiskLatentCache, LatentEntry, encode_distribution, encode_entries, sample_latent
from library.models.conditioning import TextEncoding

LatentKey = tuple[int, bool]  # (item index, flipped)
LATENT_MODES = ("memory", "disk", "off")
# How a latent is taken from the VAE's distribution (mean, std):
#   once          one fixed sample per (image, flip), seeded by (seed, image, flip): what a cache holds; the
#                 default of every trainer and A1111's "once"
#   deterministic the mean (A1111's "deterministic" sets std to 0)
#   random        a new sample every step, each image seeded by (step, position) (A1111's "random")
#   step          a new sample every step, the whole batch drawn from the step's seed: LoRA and DreamBooth
#                 without a latent cache (their latents are encoded anew every step anyway)
LATENT_DRAWS = ("once", "deterministic", "random", "step")


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator, first: int = 0,
                   whole: int | None = None) -> torch.Tensor:
    """VAE-encode a [B, 3, H, W] batch and sample scaled latents (fp32 on the CPU). `first`/`whole`: the pixels
    are rows first.. of a batch of `whole` (one process's share of it): the noise is drawn for the whole batch
    and cut to them, so they get what they get in one process."""
    mean, std = encode_distribution(vae, pixels)
    shape = mean.shape if whole is None else (whole, *mean.shape[1:])
    noise = torch.randn(shape, generator=generator)[first:first + mean.shape[0]]
    return ((mean + std * noise) * vae.config.scaling_factor).float()


class LatentSource:
    """Latents for a batch: from a cache filled once before training ("memory": encoded every run and kept in
    RAM; "disk": files keyed on image content and settings, shared by every run and by prepare_buckets.py, see
    library/data/latent_cache.py), or encoded every step ("off", e.g. for random crops). The memory cache keeps
    only what the draw needs; every draw is seeded, so a resumed run sees exactly what an uninterrupted one
    would, and the memory and disk caches give the same latents."""

    def __init__(self, data: TrainingData, vae, mode: str, seed: int, draw: str = "once",
                 cache_dir: Path | None = None, vae_batch_size: int = 1):
        if mode not in LATENT_MODES or draw not in LATENT_DRAWS:
            raise ValueError(f"latent mode {mode!r} / draw {draw!r}: expected one of {LATENT_MODES} / {LATENT_DRAWS}")
        if mode == "disk" and cache_dir is None:
            raise ValueError("the disk latent cache needs a cache folder")
        if draw == "step" and mode != "off":
            raise ValueError("the 'step' draw is for latents encoded every step (mode 'off')")
        self.data = data
        self.vae = vae
        self.mode = mode
        self.seed = seed
        self.draw = draw
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.vae_batch_size = vae_batch_size
        self.memory: dict[LatentKey, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self.disk: DiskLatentCache | None = None
        self.files: dict[LatentKey, tuple[Path, str, LatentEntry]] = {}

    def keys(self) -> list[LatentKey]:
        """Every (item, flip) the epochs can ask for."""
        flips = (False, True) if self.data.flip_aug else (False,)
        return [(i, f) for i in range(len(self.data.items)) for f in flips]

    def entry(self, key: LatentKey) -> LatentEntry:
        width, height = self.data.size_of(key[0])
        return LatentEntry(self.data.items[key[0]].path, width, height, key[1])

    def fill(self, part: tuple[int, int] | None = None) -> None:
        """Encode (memory) or find and complete (disk) every latent the epochs can ask for, once. `part`
        (index, count): complete only every count-th entry of the disk cache from index — the processes of a
        data-parallel run share its encoding, then each fills the whole, finding the others' files."""
        if part is not None and self.mode != "disk":
            raise ValueError("LatentSource.fill(part=...) shares the work of a disk cache only")
        if self.mode == "off":
            return
        keys = self.keys()
        entries = [self.entry(k) for k in keys]
        if self.mode == "memory":
            for k, _, mean, std in encode_entries(entries, self.vae, self.vae_batch_size, desc="caching latents"):
                self.memory[keys[k]] = self._kept(keys[k], mean, std)
            return
        self.disk = DiskLatentCache(self.cache_dir, self.vae)
        if part is not None:
            report, _ = self.disk.ensure(entries[part[0]::part[1]], self.vae_batch_size)
            print(f"{report.summary(self.cache_dir)}: this process's part, 1/{part[1]} of the entries")
            return
        report, digests = self.disk.ensure(entries, self.vae_batch_size)
        print(report.summary(self.cache_dir))
        self.files = {k: (path, digest, entry) for k, path, digest, entry in zip(keys, report.files, digests, entries)}

    def distribution(self, key: LatentKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of one (item, flip) from the filled disk cache."""
        if self.disk is None:
            raise RuntimeError("LatentSource.distribution needs the filled disk cache (dataset.cache_latents = 'disk')")
        return self.disk.load(*self.files[key])

    def _kept(self, key: LatentKey, mean: torch.Tensor, std: torch.Tensor):
        if self.draw == "once":
            return self._once(key, mean, std)
        if self.draw == "deterministic":
            return self._mean(mean)
        return mean, std

    def _once(self, key: LatentKey, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return sample_latent(mean, std, hash_ints(self.seed, key[0], int(key[1]), 3), self.vae.config.scaling_factor)

    def _mean(self, mean: torch.Tensor) -> torch.Tensor:
        return (mean * self.vae.config.scaling_factor).float()

    def latents(self, batch: Batch, epoch: int, step_seed: int, first: int = 0,
                whole: int | None = None) -> torch.Tensor:
        """The batch's latents [B, C, h, w] (fp32, CPU) for the step seeded with `step_seed`. `first`/`whole`:
        the batch is rows first.. of a batch of `whole` (a data-parallel process's share): every draw is the one
        those rows get in the whole batch."""
        keys = list(zip(batch.item_indices, batch.flips))
        if self.mode == "memory" and self.draw in ("once", "deterministic"):
            return torch.stack([self.memory[k] for k in keys])
        if self.mode == "off":
            if len(batch.geometry) != len(keys):
                raise ValueError("latents encoded every step need the batch's crops (a batch of TrainingData)")
            # color_aug / face crops: each sample's own stream of the step (the same on any number of processes)
            pixels = torch.stack([self.data.pixels(i, f, g.box, derived_rng(step_seed, 6, first + position))
                                  for position, ((i, f), g) in enumerate(zip(keys, batch.geometry))])
            if self.draw == "step":
                return encode_latents(self.vae, pixels, torch.Generator().manual_seed(step_seed), first, whole)
            mean, std = encode_distribution(self.vae, pixels)
            distributions = list(zip(mean, std))
        elif self.mode == "memory":
            distributions = [self.memory[k] for k in keys]
        else:
            distributions = [self.distribution(k) for k in keys]
        return self._drawn(keys, distributions, step_seed, first)

    def _drawn(self, keys: list[LatentKey], distributions: list, step_seed: int, first: int = 0) -> torch.Tensor:
        scale = self.vae.config.scaling_factor
        drawn = []
        for position, (key, (mean, std)) in enumerate(zip(keys, distributions)):
            if self.draw == "once":
                drawn.append(self._once(key, mean, std))
            elif self.draw == "deterministic":
                drawn.append(self._mean(mean))
            else:
                drawn.append(sample_latent(mean, std, hash_ints(step_seed, first + position, 7), scale))
        return torch.stack(drawn)


class ConditioningSource:
    """The text encoders' output for a batch's captions, through the model family. With `cache`, each distinct
    caption is encoded once and kept (on the CPU): valid only while no text encoder trains and captions never
    vary, which the run step checks and this class re-checks for what the run trains."""

    def __init__(self, parts, clip_skip: int = 1, cache: bool = False, trains_text_encoder: bool = False,
                 max_token_length: int = 75):
        if cache and trains_text_encoder:
            raise ValueError("dataset.cache_text_encoder_outputs = true, but this run trains the text encoder "
                             "(LoRA: network.train_text_encoder; textual inversion always does), so its outputs "
                             "change every step: set dataset.cache_text_encoder_outputs = false")
        self.parts = parts
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length
        self.cache: dict[str, TextEncoding] | None = {} if cache else None

    def encode(self, captions: list[str], grad: bool = False) -> TextEncoding:
        """The batch's text encoding on the text encoders' device."""
        family = self.parts.family
        if self.cache is None:
            with torch.set_grad_enabled(grad):
                return family.encode_text(self.parts, captions, self.clip_skip, self.max_token_length)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            with torch.no_grad():
                rows = family.encode_text(self.parts, missing, self.clip_skip, self.max_token_length).rows()
            self.cache.update(zip(missing, rows))
        return TextEncoding.stack([self.cache[c] for c in captions], self.parts.text_encoders[0].device)
