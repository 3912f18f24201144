"""Pixel augmentations sd-scripts offers besides flips and random crops, each drawing from the step's seeded
RNG. Both change the pixels every step, so they run only with latents encoded every step (the config refuses
them with a latent cache, as it does random crops).

- color_aug (sd-scripts' AugHelper): with probability 0.33, either a hue shift of up to ±8 OpenCV hue units
  (of 180) or sd-scripts' "gamma", `clip(pixels ** g, 0, 255)` on raw 0–255 values with g in [0.95, 1.05] — a
  strong brightening or darkening, kept as sd-scripts has it.
- face_crop_aug_range (sd-scripts' crop_target): for an image whose file name ends in `_cx_cy_w_h` (the face's
  centre and size in pixels), a random scale at which the face spans 1/high … 1/low of the shorter target side,
  then a crop centred on the face (slightly jittered). OpenCV (already a dependency, for tag_images.py) does
  the HSV conversion and area resize sd-scripts uses, so results match it.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

HUE_SHIFT_LIMIT = 8  # OpenCV hue units (0..180)


def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' color augmentation of an RGB image (the draws in its order)."""
    import cv2  # here: only runs with color_aug pay for importing OpenCV

    if rng.random() > 0.33:
        return image
    pixels = np.asarray(image, dtype=np.uint8).copy()
    if rng.random() > 0.5:
        # sd-scripts hands its RGB array to BGR2HSV; doing the same keeps its hues
        hsv = cv2.cvtColor(pixels, cv2.COLOR_BGR2HSV)
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        shift = 180 + shift if shift < 0 else shift
        hsv[:, :, 0] = (hsv[:, :, 0] + shift) % 180
        pixels = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    else:
        gamma = rng.uniform(0.95, 1.05)
        pixels = np.clip(pixels.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def face_info(path: Path) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) from a file name ending in `_cx_cy_w_h` (sd-scripts' convention), else None."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(token) for token in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if w > 0 and h > 0 else None


def _crop_start(target: int, length: int, face: int, face_size: int, short: int, jitter: bool, random_crop: bool,
                rng: random.Random) -> int:
    start = face - target // 2
    if random_crop:  # show some background too: centred on the face more often than not
        spread = max(length - face, face)
        start += rng.randint(0, spread) + rng.randint(0, spread) - spread
    elif jitter and face_size > short // 10 and face_size >= 40:
        start += rng.randint(-face_size // 20, face_size // 20)
    return max(0, min(start, length - target))


def face_crop(image: Image.Image, face: tuple[int, int, int, int], width: int, height: int,
              face_range: tuple[float, float], random_crop: bool, rng: random.Random) -> Image.Image:
    """sd-scripts' crop_target: scale so the face spans 1/high … 1/low of the shorter side (never below the
    size that covers width×height, never above 1 unless the image is smaller than that), crop around it."""
    import cv2  # here: only runs with face_crop_aug_range pay for importing OpenCV

    src_w, src_h = image.size
    if (src_w, src_h) == (width, height):
        return image
    cx, cy, face_w, face_h = face
    face_size, short = max(face_w, face_h), min(width, height)
    fit = max(height / src_h, width / src_w)
    low, high = face_range
    min_scale = min(1.0, max(fit, short / (face_size * high)))
    max_scale = min(1.0, max(min_scale, short / (face_size * low)))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    new_w, new_h = int(src_w * scale + 0.5), int(src_h * scale + 0.5)
    if new_w < width or new_h < height:  # smaller than the training size: cover it (sd-scripts asserts here)
        scale = fit
        new_w, new_h = max(width, int(src_w * scale + 0.5)), max(height, int(src_h * scale + 0.5))
    pixels = cv2.resize(np.asarray(image), (new_w, new_h), interpolation=cv2.INTER_AREA)
    jitter = low != high
    top = _crop_start(height, new_h, int(cy * scale + 0.5), face_size, short, jitter, random_crop, rng)
    left = _crop_start(width, new_w, int(cx * scale + 0.5), face_size, short, jitter, random_crop, rng)
    return Image.fromarray(np.ascontiguousarray(pixels[top:top + height, left:left + width]))
