"""Aspect-ratio buckets: a set of training sizes of about the same area, and the bucket each image trains at.

sd-scripts semantics (widths from min to max reso in steps, height the largest step multiple keeping
width × height ≤ resolution², both orientations plus the square), with one deliberate change: an image goes
to the bucket whose aspect ratio is closest on a log scale, so a portrait image and its landscape mirror
always get mirrored buckets (sd-scripts compares w/h linearly, which favours landscape buckets).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from library.data.folders import ImageItem
from library.data.images import header_upright_size

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class BucketSettings:
    resolution: int  # buckets hold at most resolution² pixels
    min_reso: int
    max_reso: int
    step: int  # every side is a multiple of this
    no_upscale: bool = False
    enabled: bool = True

    def describe(self) -> str:
        if not self.enabled:
            return f"off: every image resized to cover {self.resolution}x{self.resolution} and centre-cropped"
        if self.no_upscale:
            return (f"no upscale: each image at its own size, at most {self.resolution}² pixels, sides floored "
                    f"to multiples of {self.step}")
        return (f"sides {self.min_reso}-{self.max_reso} px in steps of {self.step}, "
                f"area at most {self.resolution}x{self.resolution}")


def auto_bucket_range(resolution: int, step: int, min_reso: int = 0, max_reso: int = 0) -> tuple[int, int]:
    """min/max bucket sides; 0 means automatic: half and twice the resolution (256/1024 at 512, as sd-scripts)."""
    if not min_reso:
        min_reso = max(step, resolution // 2 // step * step)
    if not max_reso:
        max_reso = max(min_reso, resolution * 2 // step * step)
    return min_reso, max_reso


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """Every bucket size, sorted: both orientations of each width plus the largest square within the area."""
    area = resolution * resolution
    square = max(step, resolution // step * step)
    sizes = {(square, square)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes)


def aspect_error(size: Size, width: int, height: int) -> float:
    """|log(bucket aspect) - log(image aspect)|: 0 for a perfect fit, the same for an image and its mirror."""
    return abs(math.log(size[0] / size[1]) - math.log(width / height))


def closest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket with the closest aspect ratio; ties go to the larger bucket (less downscaling)."""
    return min(buckets, key=lambda b: (round(aspect_error(b, width, height), 12), -b[0] * b[1], b))


def no_upscale_bucket(width: int, height: int, resolution: int, max_reso: int, step: int) -> Size:
    """bucket_no_upscale: the image's own size, scaled down to fit resolution² pixels, sides floored to `step`.

    Sides below `step` are raised to it (the only upscaling), and no side exceeds max_reso or breaks the area
    bound. Of the sizes that fit, the one closest in aspect ratio wins.
    """
    area = resolution * resolution
    scale = min(1.0, math.sqrt(area / (width * height)))
    limit = max(step, max_reso // step * step)

    def floor(x: float) -> int:
        return min(limit, max(step, int(x // step) * step))

    fit_w, fit_h = floor(width * scale), floor(height * scale)
    candidates = {(fit_w, fit_h)}
    candidates.add((fit_w, min(fit_h, floor(round(fit_w * height / width / step) * step))))
    candidates.add((min(fit_w, floor(round(fit_h * width / height / step) * step)), fit_h))
    fitting = []
    for w, h in candidates:
        if w * h > area:  # a side raised to `step` can push a thin image over the area: shrink the long side
            if w >= h:
                w = max(step, area // h // step * step)
            else:
                h = max(step, area // w // step * step)
        fitting.append((w, h))
    return min(fitting, key=lambda b: (round(aspect_error(b, width, height), 12), -b[0] * b[1], b))


def assign_bucket(width: int, height: int, settings: BucketSettings, buckets: list[Size]) -> Size:
    if settings.no_upscale:
        return no_upscale_bucket(width, height, settings.resolution, settings.max_reso, settings.step)
    return closest_bucket(width, height, buckets)


# ------------------------------------------------------------------ image sizes


def upright_size(path: Path) -> Size:
    """(width, height) as the image is shown (EXIF rotation applied), from the header only."""
    with Image.open(path) as img:
        return header_upright_size(img)


def read_sizes(paths: list[Path], workers: int | None = None) -> list[Size]:
    """upright_size of each path, in order; header reads are I/O bound, so threads help on big datasets."""
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 16:
        return [upright_size(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(upright_size, paths))


def item_sizes(items: list[ImageItem], workers: int | None = None) -> list[Size]:
    """Each item's upright size: the one its dataset scan read, else read from the header now."""
    unknown = [index for index, item in enumerate(items) if item.size is None]
    sizes: list[Size | None] = [item.size for item in items]
    for index, size in zip(unknown, read_sizes([items[i].path for i in unknown], workers)):
        sizes[index] = size
    return sizes


# ------------------------------------------------------------------ assignment and report


@dataclass
class BucketAssignment:
    settings: BucketSettings
    image_sizes: list[Size]  # per item, upright
    sizes: list[Size]  # per item: its bucket

    def rows(self, items: list[ImageItem]) -> list[tuple[Size, int, int]]:
        """(bucket, images, samples per epoch) for each bucket in use, smallest aspect ratio first."""
        images: Counter = Counter()
        samples: Counter = Counter()
        for item, size in zip(items, self.sizes):
            images[size] += 1
            samples[size] += item.repeats
        return [(size, images[size], samples[size]) for size in sorted(images, key=lambda s: (s[0] / s[1], s))]

    def mean_aspect_error(self) -> float:
        """Mean |bucket w/h - image w/h| over images (without repeats), as sd-scripts reports it."""
        errors = [abs(b[0] / b[1] - w / h) for b, (w, h) in zip(self.sizes, self.image_sizes)]
        return sum(errors) / len(errors) if errors else 0.0

    def mean_cropped(self) -> float:
        """Mean fraction of each image's area cut off by the cover-resize and centre crop."""
        ratios = [(b[0] / b[1]) / (w / h) for b, (w, h) in zip(self.sizes, self.image_sizes)]
        cut = [1 - min(r, 1 / r) for r in ratios]
        return sum(cut) / len(cut) if cut else 0.0

    def table_lines(self, items: list[ImageItem]) -> list[str]:
        """The bucket table printed by --check, before training and by prepare_buckets.py."""
        lines = [f"buckets ({self.settings.describe()}):",
                 f"  {'bucket':>11}  {'aspect':>6}  {'images':>6}  {'samples/epoch':>13}"]
        for (w, h), images, samples in self.rows(items):
            lines.append(f"  {f'{w}x{h}':>11}  {w / h:>6.2f}  {images:>6}  {samples:>13}")
        lines.append(f"  mean aspect-ratio error {self.mean_aspect_error():.3f} "
                     f"(on average {self.mean_cropped():.1%} of an image is cropped away)")
        return lines


UPSCALE_LIMIT = 2.0  # images enlarged more than this to reach their training size are listed
_UPSCALE_LIST = 10


def upscale_warning(items: list[ImageItem], assignment: BucketAssignment, limit: float = UPSCALE_LIMIT
                    ) -> list[str]:
    """Lines listing the images enlarged more than `limit` times to cover their training size (smaller than
    1/limit of it on a side), largest factor first: a warning, not an error — small images train, but blurry."""
    upscaled = []
    for item, (w, h), (bw, bh) in zip(items, assignment.image_sizes, assignment.sizes):
        factor = max(bw / w, bh / h)  # resize_and_crop scales by this to cover the training size
        if factor > limit:
            upscaled.append((factor, item.path, (w, h), (bw, bh)))
    if not upscaled:
        return []
    upscaled.sort(key=lambda found: (-found[0], str(found[1])))
    noun, own = ("image is", "its") if len(upscaled) == 1 else ("images are", "their")
    lines = [f"warning: {len(upscaled)} {noun} upscaled more than {limit:g}x to {own} training size (upscaled "
             "images train blurry; use larger images, or a lower dataset.resolution):"]
    lines += [f"  {path} {w}x{h} -> {bw}x{bh} ({factor:.3g}x)" for factor, path, (w, h), (bw, bh) in
              upscaled[:_UPSCALE_LIST]]
    if len(upscaled) > _UPSCALE_LIST:
        lines.append(f"  ... and {len(upscaled) - _UPSCALE_LIST} more")
    return lines


def assign_buckets(items: list[ImageItem], settings: BucketSettings, workers: int | None = None) -> BucketAssignment:
    """Give every item a bucket by its size (from the scan, or read from the header)."""
    buckets = bucket_resolutions(settings.resolution, settings.min_reso, settings.max_reso, settings.step)
    image_sizes = item_sizes(items, workers)
    sizes = [assign_bucket(w, h, settings, buckets) for w, h in image_sizes]
    return BucketAssignment(settings, image_sizes, sizes)


def square_assignment(items: list[ImageItem], resolution: int, workers: int | None = None) -> BucketAssignment:
    """Buckets off: every image at resolution², reported in the same table form (prepare_buckets.py)."""
    settings = BucketSettings(resolution, resolution, resolution, resolution, enabled=False)
    image_sizes = item_sizes(items, workers)
    return BucketAssignment(settings, image_sizes, [(resolution, resolution)] * len(items))
