"""A1111's embedding preview images: the caption overlay (embedding name, checkpoint, vectors and step) and the
embedding stored in the image's pixels, in A1111's layout so its embedding loader reads the image even when the
PNG text chunk is gone (images re-saved by a chat app or an editor keep their pixels, not their chunks).

The pixel layout (A1111's modules/textual_inversion/image_embedding.py, re-implemented here because A1111 is not
a library one can import): the embedding dict as JSON (tensors as {"TORCHTENSOR": nested list}), zlib level 9;
its low and high nibbles, each cycled to fill a block of the image's height × k × 3 channels, patterned with
dots shaded by the first vector and XOR-ed with a fixed pseudo-random stream; the low block to the left of the
image, the high block to the right, each after one black column.
"""
from __future__ import annotations

import json
import math
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_CHANNELS = 3


def _json(data: dict) -> bytes:
    def encode(value):
        if hasattr(value, "detach"):  # a torch tensor
            return {"TORCHTENSOR": value.detach().cpu().tolist()}
        raise TypeError(f"cannot store {type(value).__name__} in an embedding image")

    return json.dumps(data, default=encode).encode()


@lru_cache(maxsize=8)
def _stream(count: int) -> np.ndarray:
    """A1111's pseudo-random bytes: an LCG (a = 1664525, c = 1013904223, m = 2^32, seed 0), each value mod 255."""
    values = np.empty(count, dtype=np.uint8)
    state = 0
    for i in range(count):
        state = (1664525 * state + 1013904223) % 2**32
        values[i] = state % 255
    return values


def _scramble(block: np.ndarray) -> np.ndarray:
    """XOR with the low nibble of the stream (its own inverse)."""
    return np.bitwise_xor(block.astype(np.uint8), _stream(block.size).reshape(block.shape) & 0x0F)


def _dotted(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """Dots 6 px wide every 8 px (every other row shifted by 4), shaded in turn by `shades`, in the high nibble."""
    pattern = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(pattern)
    index = 0
    for x in range(-6, pattern.size[0], 8):
        for row, y in enumerate(range(-6, pattern.size[1], 8)):
            left = x + (4 if row % 2 == 0 else 0)
            shade = int(shades[index % len(shades)])
            index += 1
            draw.ellipse((left, y, left + 6, y + 6), fill=(shade, shade, shade))
    return block ^ (np.asarray(pattern).astype(np.uint8) & 0xF0)


def _block(nibbles: np.ndarray, height: int, shades: np.ndarray) -> Image.Image:
    size = nibbles.shape[0] + (height - nibbles.shape[0] % height)
    size += height * _CHANNELS - size % (height * _CHANNELS)
    filled = np.resize(nibbles, size).reshape(height, -1, _CHANNELS)  # np.resize repeats the data cyclically
    return Image.fromarray(_scramble(_dotted(filled, shades)), mode="RGB")


def embed_in_pixels(image: Image.Image, data: dict) -> Image.Image:
    """`image` with `data` (an A1111 embedding dict) stored in blocks beside it, as A1111 writes them."""
    payload = np.frombuffer(zlib.compress(_json(data), level=9), np.uint8)
    # the dots' shades follow the first vector: A1111's "string_to_param", or SDXL's "clip_l"/"clip_g" tensors
    tensors = data.get("string_to_param") or {key: value for key, value in data.items() if hasattr(value, "detach")}
    first = next(iter(tensors.values()))
    row = np.asarray(first.detach().cpu().float()[0][:1024].tolist(), dtype=np.float64)
    shades = (np.abs(row) / max(float(np.max(np.abs(row))), 1e-12) * 255).astype(np.uint8)
    height = image.size[1]
    low, high = _block(payload & 0x0F, height, shades), _block(payload >> 4, height, shades[::-1])
    out = Image.new("RGB", (image.size[0] + low.size[0] + high.size[0] + 2, height), (0, 0, 0))
    out.paste(low, (0, 0))
    out.paste(image.convert("RGB"), (low.size[0] + 1, 0))
    out.paste(high, (low.size[0] + 1 + image.size[0] + 1, 0))
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's scalable built-in font: no font file to ship
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def caption_overlay(image: Image.Image, title: str, left: str, middle: str, right: str) -> Image.Image:
    """A1111's caption: a dark gradient at top and bottom, the title top-left, three footers along the bottom,
    each scaled to fit."""
    width, height = image.size
    fade = np.array([max(1 - math.cos(y / height * 1.5), 1 - math.cos((height - y) / height * 1.5 * 1.1))
                     for y in range(height)])
    alpha = Image.fromarray((fade * 255).astype(np.uint8).reshape(height, 1)).resize((width, height))
    shade = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    shade.putalpha(alpha)
    out = Image.alpha_composite(image.convert("RGBA"), shade)
    draw, padding = ImageDraw.Draw(out), 10

    def fitted(text: str, room: float, start: int) -> ImageFont.ImageFont:
        measured = max(draw.textbbox((0, 0), text or " ", font=_font(start))[2], 1)
        return _font(max(6, min(int(start * room / measured), 72)))

    title_font = fitted(title, width * 0.75 - padding * 4, 32)
    draw.text((padding, padding), title, anchor="lt", font=title_font, fill=(255, 255, 255, 230))
    size = min(fitted(text, width / 3 - padding, 32).size for text in (left, middle, right))
    footer = _font(size)
    for text, x, anchor in ((left, padding, "ls"), (middle, width / 2, "ms"), (right, width - padding, "rs")):
        draw.text((x, height - padding), text, anchor=anchor, font=footer, fill=(255, 255, 255, 230))
    return out.convert("RGB")
