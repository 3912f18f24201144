"""VAE encoding of training images, and a disk cache of the results that is never stale.

A cache entry is addressed by everything that decides its latent: the image file's bytes (SHA-256), the
training size, the crop, the flip, the VAE's identity (a hash of its config and its encoder weights,
the only weights that shape a latent; swapping in a VAE with a fine-tuned decoder keeps the cache) and the
precision it encodes in (a bf16 run's VAE encodes in bf16: its entries never mix with fp32 ones). Edit an
image, change a bucket setting or swap the VAE and only the affected entries are encoded again; entries for
old settings stay on disk (they are reused if you switch back; deleting the folder is always safe).

Each entry stores the VAE's latent distribution (mean and std, fp32, before the scaling factor), not a
sample: the trainer draws one fixed sample per (image, flip) from the run's seed, exactly as the memory cache
does, so one cache serves runs with any seed and a resumed run sees the same latents.

Files are written atomically (temp file + os.replace) and checked when used: metadata, shapes and finite
values. A truncated or corrupt file is reported and rebuilt, never trained on.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from PIL import UnidentifiedImageError
from safetensors import safe_open
from tqdm import tqdm

from library.errors import UserError
from library.training.checkpoints import atomic_save_safetensors
# _open_decoded: load_image's decoding (EXIF orientation) for bytes already in memory, the bytes that were hashed
from library.data.images import _open_decoded, resize_and_crop, to_rgb, to_tensor

CACHE_FORMAT = "kiln-latents-1"  # bump when the pixels → latent recipe changes (resize filter, crop, dtype)
CACHE_FOLDER_NAME = ".kiln-cache"  # hidden: dataset scans skip dot-folders, so it is never taken for images
CENTER_CROP = "center"
_ENCODER_PREFIXES = ("encoder.", "quant_conv.")
_DECODER_ONLY_CONFIG = ("scaling_factor", "shift_factor", "force_upcast", "latents_mean", "latents_std")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class LatentEntry:
    """One latent a run needs: an image at a training size, centre-cropped, maybe mirrored."""

    path: Path
    width: int
    height: int
    flip: bool = False
    crop: str = CENTER_CROP


class CacheEntryError(UserError, ValueError):
    """A cache file that cannot be used (truncated, corrupt, or written for other settings)."""


def default_cache_dir(train_dir: str, subset_dirs: Iterable[str]) -> Path:
    """`<train_dir>/.kiln-cache`, or beside the first subset folder when only [[dataset.subsets]] are set."""
    if train_dir:
        return Path(train_dir) / CACHE_FOLDER_NAME
    for folder in subset_dirs:
        return Path(folder).parent / CACHE_FOLDER_NAME
    raise ValueError("dataset: no train_dir or subsets to place the latent cache beside; set dataset.cache_dir")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def vae_identity(vae) -> str:
    """A hash of what decides a latent: the VAE config (less decoder-side fields) and its encoder weights.
    Weights are hashed as fp32 so a VAE loaded in fp16 and upcast matches one loaded in fp32."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_") and k not in _DECODER_ONLY_CONFIG}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(_ENCODER_PREFIXES):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()[:32]


def latent_shape(vae, width: int, height: int) -> tuple[int, int, int]:
    """(channels, h, w) of the latent the VAE makes from a width×height image."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, height // factor, width // factor


def entry_pixels(entry: LatentEntry, data: bytes) -> torch.Tensor:
    """The entry's image, decoded from `data` (the bytes that were hashed), as a [3, H, W] tensor in [-1, 1]."""
    if entry.crop != CENTER_CROP:
        raise ValueError(f"cached latents need a centre crop, got {entry.crop!r}")
    try:
        image = to_rgb(_open_decoded(io.BytesIO(data)))  # the same decoding load_image applies to a path
    except UnidentifiedImageError as exc:
        raise OSError(f"cannot identify image file {entry.path}") from exc
    except OSError as exc:  # e.g. truncated since the dataset scan
        raise OSError(f"cannot decode {entry.path}: {exc}") from exc
    tensor = to_tensor(resize_and_crop(image, entry.width, entry.height))
    return tensor.flip(-1) if entry.flip else tensor


@torch.no_grad()
def encode_distribution(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE-encode a [B, 3, H, W] batch; the latent distribution's mean and std (unscaled, fp32, CPU)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def sample_latent(mean: torch.Tensor, std: torch.Tensor, seed: int, scaling_factor: float) -> torch.Tensor:
    """One scaled latent [C, h, w] drawn from (mean, std) with a fixed seed (the same draw every run)."""
    noise = torch.randn((1, *mean.shape), generator=torch.Generator().manual_seed(seed))[0]
    return ((mean + std * noise) * scaling_factor).float()


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """fn over items in a thread pool, results in order, at most `ahead` running or waiting unread
    (image decoding releases the GIL, so the pool decodes while the caller runs the VAE)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-decode")
    pending: deque = deque()
    iterator = iter(items)
    try:
        for item in iterator:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            for item in iterator:  # top up by one
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_and_decode(entry: LatentEntry) -> tuple[str, torch.Tensor]:
    data = entry.path.read_bytes()
    return hashlib.sha256(data).hexdigest(), entry_pixels(entry, data)


def encode_entries(entries: list[LatentEntry], vae, batch_size: int = 1, workers: int = 0,
                   desc: str = "encoding latents") -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(entry index, image sha256, mean, std) for every entry, decoding ahead in threads while the VAE runs.
    Same-size entries are batched (up to batch_size) so the VAE sees full batches."""
    if not entries:
        return
    workers = workers or min(8, os.cpu_count() or 1)
    order = sorted(range(len(entries)), key=lambda i: (entries[i].width, entries[i].height, i))
    stream = prefetch(_read_and_decode, [entries[i] for i in order], workers, ahead=max(2 * workers, batch_size))
    bar = tqdm(total=len(entries), desc=desc, unit="img", leave=False, dynamic_ncols=True)
    batch: list[tuple[int, str, torch.Tensor]] = []
    try:
        for index, (digest, pixels) in zip(order, stream):
            if batch and (pixels.shape != batch[0][2].shape or len(batch) == batch_size):
                yield from _encode_batch(vae, batch)
                bar.update(len(batch))
                batch = []
            batch.append((index, digest, pixels))
        if batch:
            yield from _encode_batch(vae, batch)
            bar.update(len(batch))
    finally:
        bar.close()
        stream.close()


def _encode_batch(vae, batch: list[tuple[int, str, torch.Tensor]]):
    means, stds = encode_distribution(vae, torch.stack([pixels for _, _, pixels in batch]))
    for (index, digest, _), mean, std in zip(batch, means, stds):
        yield index, digest, mean.clone(), std.clone()  # clone: a view would keep the whole batch alive


@dataclass
class EnsureReport:
    """What `DiskLatentCache.ensure` did."""

    files: list[Path]  # per entry, the cache file holding its latent
    reused: int = 0
    encoded: int = 0
    rebuilt: list[tuple[Path, str]] = field(default_factory=list)  # corrupt files found and rebuilt
    seconds: float = 0.0
    encode_seconds: float = 0.0

    def summary(self, folder: Path) -> str:
        rate = f", {self.encoded / self.encode_seconds:.2f} img/s" if self.encoded and self.encode_seconds else ""
        text = (f"latent cache {folder}: {self.reused} reused, {self.encoded} encoded{rate} "
                f"({self.seconds:.1f} s)")
        if self.rebuilt:
            text += f"; {len(self.rebuilt)} corrupt file(s) rebuilt"
        return text


class DiskLatentCache:
    """Latent distributions on disk, one safetensors file per (image bytes, size, crop, flip, VAE)."""

    def __init__(self, folder: Path, vae, vae_id: str | None = None):
        self.folder = Path(folder)
        self.vae = vae
        self.vae_id = vae_id or vae_identity(vae)
        self.encode_dtype = str(vae.dtype).removeprefix("torch.")  # what encode_distribution runs the VAE in

    # ---------------------------------------------------------------- addressing
    def _fields(self, digest: str, entry: LatentEntry) -> dict[str, str]:
        fields = {"format": CACHE_FORMAT, "image_sha256": digest, "width": str(entry.width),
                  "height": str(entry.height), "crop": entry.crop, "flip": str(int(entry.flip)), "vae": self.vae_id}
        if self.encode_dtype != "float32":  # fp32 entries keep the key they had before precision was part of it
            fields["encode_dtype"] = self.encode_dtype
        return fields

    def file_for(self, digest: str, entry: LatentEntry) -> Path:
        key = hashlib.sha256(json.dumps(self._fields(digest, entry), sort_keys=True).encode()).hexdigest()[:40]
        return self.folder / "latents" / key[:2] / f"{key}.safetensors"

    # ---------------------------------------------------------------- reading and writing
    def check(self, path: Path, digest: str, entry: LatentEntry, full: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Raise CacheEntryError unless `path` is a complete entry for exactly these settings. The quick check
        reads the header only (safetensors refuses a truncated file); `full` also loads and returns the tensors."""
        expected = self._fields(digest, entry)
        shape = latent_shape(self.vae, entry.width, entry.height)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                wrong = [k for k in dict.fromkeys([*expected, "encode_dtype"]) if metadata.get(k) != expected.get(k)]
                if wrong:
                    raise CacheEntryError(f"written for other settings ({', '.join(wrong)})")
                if set(handle.keys()) != {"mean", "std"}:
                    raise CacheEntryError(f"unexpected tensors {sorted(handle.keys())}")
                for name in ("mean", "std"):
                    got = tuple(handle.get_slice(name).get_shape())
                    if got != shape:
                        raise CacheEntryError(f"{name} has shape {got}, expected {shape}")
                if not full:
                    return None
                mean, std = handle.get_tensor("mean"), handle.get_tensor("std")
        except CacheEntryError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for damaged files
            raise CacheEntryError(f"unreadable ({exc})") from None
        if mean.dtype != torch.float32 or not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise CacheEntryError("holds non-finite values or a wrong dtype")
        return mean, std

    def write(self, path: Path, digest: str, entry: LatentEntry, mean: torch.Tensor, std: torch.Tensor) -> None:
        metadata = {**self._fields(digest, entry), "source": str(entry.path)}
        atomic_save_safetensors({"mean": mean.contiguous(), "std": std.contiguous()}, path, metadata)

    def load(self, path: Path, digest: str, entry: LatentEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, std) of an entry for training. A file damaged since `ensure` is reported and re-encoded."""
        try:
            result = self.check(path, digest, entry, full=True)
            assert result is not None
            return result
        except CacheEntryError as err:
            print(f"latent cache: {path} is {err}; encoding {entry.path} again")
        _, new_digest, mean, std = next(encode_entries([entry], self.vae, workers=1, desc="re-encoding"))
        self.write(self.file_for(new_digest, entry), new_digest, entry, mean, std)
        return mean, std

    # ---------------------------------------------------------------- filling
    def ensure(self, entries: list[LatentEntry], batch_size: int = 1, workers: int = 0,
               verbose: bool = True) -> tuple[EnsureReport, list[str]]:
        """Make sure every entry has a valid file: reuse what is there, encode what is missing, rebuild what
        is damaged. Returns the report and each entry's image hash. Each file is written as soon as it is
        encoded, so an interrupted run keeps its work and the next one continues from there."""
        start = time.perf_counter()
        workers = workers or min(8, os.cpu_count() or 1)
        paths = sorted({entry.path for entry in entries})
        with ThreadPoolExecutor(max_workers=workers) as pool:
            hashes = tqdm(pool.map(file_sha256, paths), total=len(paths), desc="hashing images", unit="img",
                          leave=False, disable=not verbose or len(paths) < 100)
            digests_by_path = dict(zip(paths, hashes))
        digests = [digests_by_path[entry.path] for entry in entries]
        report = EnsureReport([self.file_for(d, e) for d, e in zip(digests, entries)])
        sharing: dict[Path, list[int]] = {}  # identical images at identical settings share one file
        for index, path in enumerate(report.files):
            sharing.setdefault(path, []).append(index)
        todo = []
        for path, indices in sharing.items():
            entry, digest = entries[indices[0]], digests[indices[0]]
            if path.is_file():
                try:
                    self.check(path, digest, entry)
                    report.reused += 1
                    continue
                except CacheEntryError as err:
                    report.rebuilt.append((path, str(err)))
                    if verbose:
                        print(f"latent cache: {path} ({entry.path}) is {err}; rebuilding it")
            todo.append(indices)
        encode_start = time.perf_counter()
        firsts = [entries[indices[0]] for indices in todo]
        for k, digest, mean, std in encode_entries(firsts, self.vae, batch_size, workers):
            path = self.file_for(digest, firsts[k])  # the image may have changed since it was hashed
            self.write(path, digest, firsts[k], mean, std)
            report.encoded += 1
            for index in todo[k]:
                report.files[index], digests[index] = path, digest
        report.encode_seconds = time.perf_counter() - encode_start
        report.seconds = time.perf_counter() - start
        return report, digests
