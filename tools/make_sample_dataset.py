"""Generate the bundled sample dataset (examples/sample_dataset) deterministically.

Synthetic drawings only (no third-party images): a brown "kiln pot" vase for the train folder and
plain pots of other shapes and colours as regularisation (class) images. Re-run to re-make them:

    python tools/make_sample_dataset.py [--out examples/sample_dataset]
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from library.atomic import write_atomically  # noqa: E402

SEED = 1234
SUPERSAMPLE = 4  # draw large, then downsample, for smooth edges
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "examples" / "sample_dataset"

BACKGROUNDS = {
    "white background": (246, 246, 244),
    "beige background": (236, 222, 196),
    "blue background": (196, 216, 236),
    "grey background": (200, 200, 204),
}
# Profiles: (height fraction, radius fraction) control points, bottom to top.
VASE = [(0.0, 0.55), (0.35, 1.0), (0.75, 0.5), (0.9, 0.42), (1.0, 0.56)]
BOWL = [(0.0, 0.5), (0.5, 0.95), (1.0, 1.0)]
JAR = [(0.0, 0.8), (0.2, 0.95), (0.8, 0.95), (1.0, 0.75)]
JUG = [(0.0, 0.6), (0.45, 1.0), (0.85, 0.6), (1.0, 0.65)]


@dataclass(frozen=True)
class PotSpec:
    name: str
    size: tuple[int, int]
    profile: list[tuple[float, float]]
    colour: tuple[int, int, int]
    background: str
    centre_x: float  # fraction of width
    base_y: float  # fraction of height
    height: float  # fraction of image height
    width: float  # half-width as a fraction of image height
    stripe: bool
    caption: str


def _radius(profile: list[tuple[float, float]], t: float) -> float:
    """Cosine-eased interpolation between the profile's control points."""
    for (t0, r0), (t1, r1) in zip(profile, profile[1:]):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return r0 + (r1 - r0) * (1 - math.cos(math.pi * u)) / 2
    return profile[-1][1]


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(c * factor))) for c in colour)


def draw_pot(spec: PotSpec) -> Image.Image:
    """Render one pot on a plain background with a table band and a soft shadow."""
    w, h = spec.size[0] * SUPERSAMPLE, spec.size[1] * SUPERSAMPLE
    bg = BACKGROUNDS[spec.background]
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    base_y = spec.base_y * h
    draw.rectangle((0, base_y - 0.02 * h, w, h), fill=_shade(bg, 0.9))  # table
    cx, pot_h, half_w = spec.centre_x * w, spec.height * h, spec.width * h
    draw.ellipse((cx - half_w * 0.9, base_y - 0.04 * h, cx + half_w * 0.9, base_y + 0.03 * h), fill=_shade(bg, 0.7))
    steps = 60
    ys = [base_y - pot_h * i / steps for i in range(steps + 1)]
    rs = [half_w * _radius(spec.profile, i / steps) for i in range(steps + 1)]
    right = [(cx + r, y) for r, y in zip(rs, ys)]
    left = [(cx - r, y) for r, y in zip(rs, ys)][::-1]
    draw.polygon(right + left, fill=spec.colour)
    shadow_side = [(cx + r * 0.35, y) for r, y in zip(rs, ys)][::-1]
    draw.polygon(right + shadow_side, fill=_shade(spec.colour, 0.78))  # darker right side
    if spec.stripe:
        band = int(steps * 0.45)
        for i in range(band, band + 3):
            draw.line((cx - rs[i], ys[i], cx + rs[i], ys[i]), fill=_shade(spec.colour, 1.35), width=SUPERSAMPLE * 2)
    top_r, top_y = rs[-1], ys[-1]
    draw.ellipse((cx - top_r, top_y - 0.03 * h, cx + top_r, top_y + 0.03 * h), fill=_shade(spec.colour, 1.15))
    inner = top_r * 0.8
    draw.ellipse((cx - inner, top_y - 0.022 * h, cx + inner, top_y + 0.022 * h), fill=_shade(spec.colour, 0.4))
    return img.resize(spec.size, Image.Resampling.LANCZOS)


def _specs() -> tuple[list[PotSpec], list[PotSpec]]:
    rng = random.Random(SEED)
    sizes = [(128, 128), (128, 128), (128, 96), (96, 128), (128, 128), (128, 128)]
    train = []
    for i, size in enumerate(sizes):
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        shade = rng.uniform(0.85, 1.1)
        stripe = i % 2 == 0
        tags = ["kiln pot", "vase", "brown", background] + (["glazed stripe"] if stripe else [])
        train.append(PotSpec(
            name=f"kiln_pot_{i + 1:02d}{'.png' if i % 2 == 0 else '.jpg'}",
            size=size, profile=VASE, colour=_shade((140, 82, 45), shade), background=background,
            centre_x=rng.uniform(0.42, 0.58), base_y=rng.uniform(0.86, 0.92), height=rng.uniform(0.58, 0.72),
            width=rng.uniform(0.2, 0.25), stripe=stripe, caption=", ".join(tags),
        ))
    reg_kinds = [
        ("bowl", BOWL, (150, 150, 155), "grey"),
        ("jar", JAR, (70, 100, 160), "blue"),
        ("jug", JUG, (80, 130, 80), "green"),
        ("jar", JAR, (200, 110, 60), "orange"),
    ]
    reg = []
    for i, (shape, profile, colour, colour_name) in enumerate(reg_kinds):
        reg.append(PotSpec(
            name=f"pot_{i + 1:02d}{'.png' if i % 2 == 0 else '.jpg'}",
            size=(128, 128), profile=profile, colour=colour, background="white background",
            centre_x=rng.uniform(0.45, 0.55), base_y=rng.uniform(0.86, 0.9),
            height=rng.uniform(0.35, 0.45) if shape == "bowl" else rng.uniform(0.5, 0.65),
            width=rng.uniform(0.26, 0.32) if shape == "bowl" else rng.uniform(0.2, 0.25),
            stripe=False, caption=f"pot, {shape}, {colour_name}, white background",
        ))
    return train, reg




def _save(spec: PotSpec, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = draw_pot(spec)
    target = folder / spec.name
    if target.suffix == ".png":
        write_atomically(target, lambda tmp: img.save(tmp, format="PNG", optimize=True))
    else:
        write_atomically(target, lambda tmp: img.save(tmp, format="JPEG", quality=88))
    caption = target.with_suffix(".txt")
    write_atomically(caption, lambda tmp: Path(tmp).write_text(spec.caption + "\n", encoding="utf-8"))


def make_sample_dataset(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write the sample dataset under `out`; returns the image paths written."""
    train, reg = _specs()
    written = []
    for folder, specs in ((out / "train" / "10_kiln pot", train), (out / "reg" / "1_pot", reg)):
        for spec in specs:
            _save(spec, folder)
            written.append(folder / spec.name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="dataset root (default: %(default)s)")
    args = parser.parse_args()
    for path in make_sample_dataset(args.out):
        print(path)


if __name__ == "__main__":
    main()
