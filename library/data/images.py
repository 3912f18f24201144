"""Image file I/O: decoding, colour-mode normalisation, resize/crop and tensor conversion.

Every training image goes through `load_image`, so EXIF orientation, transparency and odd pixel
formats are handled the same way in bucketing, latent caching and preview code.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Modes whose pixel values span 0..65535 (16-bit greyscale PNG/TIFF); "I" is how Pillow may expose them.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _open_decoded(path: Path) -> Image.Image:
    """Open and fully decode `path`, applying EXIF orientation. Raises on unreadable or truncated files."""
    with Image.open(path) as img:
        img.load()
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - corrupt EXIF: viewers show the pixels as stored, so do we
            upright = img.copy()
    return upright


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale 0..65535 to 0..255 (a plain convert("L") clips everything above 255 to white)."""
    values = np.asarray(img).astype(np.float64)
    scaled = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent areas are composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(img).convert("RGB")
    if img.mode == "F":
        # Float images are conventionally 0..1; larger maxima mean they already hold 0..255 values.
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        scaled = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr


def load_image(path: Path) -> Image.Image:
    """Load `path` as an upright 8-bit RGB image.

    Honours EXIF orientation, composites transparency on white, scales 16-bit greyscale properly and
    converts CMYK/palette/greyscale. Fully decodes, so truncated or corrupt files raise OSError.
    """
    path = Path(path)
    try:
        return to_rgb(_open_decoded(path))
    except UnidentifiedImageError as exc:
        raise OSError(f"cannot identify image file {path} (not an image, or an unsupported format)") from exc


def load_alpha(path: Path) -> Image.Image | None:
    """The alpha channel of `path` as an upright "L" image, or None when the image has no transparency."""
    img = _open_decoded(Path(path))
    if not _has_alpha(img):
        return None
    return img.convert("RGBA").getchannel("A")


EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF rotations by 90°: width and height swap once upright


def header_upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown (EXIF rotation applied), from what opening it read, never the
    pixels. Pillow's getexif() decodes a whole PNG to look for an eXIf chunk after the image data; here a PNG's
    EXIF counts where Pillow and exiftool write it, before the image data."""
    width, height = img.size
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            exif = Image.Exif()
            if raw:
                exif.load(raw)
        else:
            exif = img.getexif()
        orientation = exif.get(EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - corrupt EXIF: load_image then ignores it too
        orientation = None
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


@dataclass(frozen=True)
class ImageCheck:
    """What a dataset scan learns from one image file: why it cannot be used (None: it can), and its size."""

    problem: str | None
    size: tuple[int, int] | None = None  # upright (width, height) of a usable image


def _verify_or_decode(img: Image.Image) -> None:
    if img.format == "PNG":
        # every chunk's CRC checked, truncation anywhere caught, without inflating the pixels: 5-20x cheaper
        # than decoding (bench/bench_dataset.py)
        img.verify()
        return
    if img.format == "JPEG":
        # decoding at 1/8 scale still reads every byte, so truncation is caught, at a fraction of the cost
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()


def check_image(path: Path) -> ImageCheck:
    """Whether `path` is a usable image (PNG: chunk checksums verified; JPEG: decoded at 1/8 scale; other formats
    decoded in full) and its upright size, opening the file once."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some imported library flipped Pillow's global switch; truncated files would then pass as half-grey images.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some imported code; "
            "Kiln needs it False to detect truncated images"
        )
    try:
        with Image.open(path) as img:
            if img.width < 1 or img.height < 1:
                return ImageCheck("image has no pixels")
            size = header_upright_size(img)
            _verify_or_decode(img)
    except UnidentifiedImageError:
        if Path(path).stat().st_size == 0:  # asked only now: one stat call less per good image
            return ImageCheck("empty file (0 bytes)")
        return ImageCheck("cannot identify image file (not an image, or an unsupported format)")
    except Image.DecompressionBombError as exc:
        return ImageCheck(f"too large to decode safely ({exc})")
    except OSError as exc:
        text = str(exc)
        if "truncated" in text.lower():
            return ImageCheck(f"truncated ({text})")
        return ImageCheck(text or type(exc).__name__)
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:  # Pillow's plugins raise these on bad data
        return ImageCheck(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return ImageCheck(None, size)


def image_problem(path: Path) -> str | None:
    """None when `path` is a usable image (see check_image), else a short human-readable reason."""
    return check_image(path).problem


@dataclass(frozen=True)
class CropBox:
    """Where a training image's pixels come from: the size it is resized to (covering the training size,
    aspect ratio kept) and the top-left corner of the training-size crop taken from that resized image."""

    resized_width: int
    resized_height: int
    left: int
    top: int


def cover_crop(src_w: int, src_h: int, width: int, height: int, random_crop: bool = False,
               rng: random.Random | None = None) -> CropBox:
    """The cover resize and crop of a src_w×src_h image to width×height: centred unless `random_crop`,
    which draws the offset from `rng` (or the global `random`), left first."""
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    scale = max(width / src_w, height / src_h)
    new_w = max(width, round(src_w * scale))
    new_h = max(height, round(src_h * scale))
    if random_crop:
        source = rng if rng is not None else random
        left = source.randint(0, new_w - width)
        top = source.randint(0, new_h - height)
    else:
        left = (new_w - width) // 2
        top = (new_h - height) // 2
    return CropBox(new_w, new_h, left, top)


def resize_and_crop(
    img: Image.Image,
    width: int,
    height: int,
    random_crop: bool = False,
    rng: random.Random | None = None,
    box: CropBox | None = None,
) -> Image.Image:
    """Resize to cover width×height keeping the aspect ratio, then crop to exactly width×height.

    Lanczos filtering in Pillow widens its kernel when shrinking, so it averages like an area filter.
    The crop is `box` when given (decided beforehand, see `cover_crop`), else centred unless `random_crop`,
    which draws the offset from `rng` (or the global `random`).
    """
    box = box or cover_crop(*img.size, width, height, random_crop, rng)
    if (box.resized_width, box.resized_height) != img.size:
        img = img.resize((box.resized_width, box.resized_height), Image.Resampling.LANCZOS)
    return img.crop((box.left, box.top, box.left + width, box.top + height))


def to_tensor(img: Image.Image) -> "torch.Tensor":
    """Float tensor [3, H, W] in [-1, 1] (the range the VAE expects)."""
    import torch  # here, not at the top: scanning a dataset or tagging images never needs torch

    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return tensor.to(torch.float32) / 127.5 - 1.0
