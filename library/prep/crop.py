"""Dataset preparation: crop each image to the target size around its focal point and lay out `NN_name/`.

The focal point is, in order: the detected faces (OpenCV's bundled Haar cascade), else the most salient
region (spectral-residual saliency, numpy only), else the centre. The crop is the largest window of the target
aspect ratio centred as near the focal point as the image allows (or, with `face_zoom`, a window a set multiple
of the face size), then resized to the target with Lanczos. Originals are only read; output goes to a new
`<out>/<repeats>_<name>/` folder, built in a hidden staging folder and renamed into place when complete.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from library.errors import UserError
from library.data.images import IMAGE_EXTENSIONS, load_image, to_rgb
from library.prep.tag_edit import caption_paths, normalise_extension
from library.prep.tagging import IMAGE_ERRORS, TaggingError, require_package

Box = tuple[int, int, int, int]  # left, top, width, height
Detector = Callable[[Image.Image], list[Box]]
FOCUS_MODES = ("auto", "face", "saliency", "centre")
IMAGE_FORMATS = {"png": ".png", "jpg": ".jpg"}
FACE_CASCADE = "haarcascade_frontalface_default.xml"
_SALIENCY_SIDE = 64
_SALIENCY_MIN_PEAK = 2.0  # peak/mean of the map; flat or noise-like images stay near 1


class PrepareError(UserError, ValueError):
    """Bad input to `prepare`; the message names the folder or option and the fix."""


# ---------------------------------------------------------------------------------------------- focal point

def haar_face_detector(cascade: str = FACE_CASCADE, max_side: int = 1024) -> Detector:
    """Frontal-face detector from the Haar cascade that ships inside the opencv-python(-headless) wheel."""
    try:
        cv2 = require_package("cv2", "face detection", "'opencv-python-headless<5'")
    except TaggingError as exc:
        raise PrepareError(str(exc)) from exc
    path = Path(cv2.data.haarcascades) / cascade
    classifier = cv2.CascadeClassifier(str(path)) if path.is_file() else None
    if classifier is None or classifier.empty():
        raise PrepareError(f"OpenCV {cv2.__version__} has no Haar cascade {path} (OpenCV 5 dropped them): "
                           "pip install 'opencv-python-headless<5', or use --focus saliency")

    def detect(img: Image.Image) -> list[Box]:
        grey = to_rgb(img).convert("L")
        scale = min(1.0, max_side / max(grey.size))  # big photos: detection cost grows with pixels, faces don't shrink
        if scale < 1.0:
            grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.BOX)
        smallest = max(24, round(0.05 * min(grey.size)))
        # No histogram equalisation: Haar features are variance-normalised already, and equalising images with
        # large flat areas (studio backdrops) stretches noise and loses faces.
        found = classifier.detectMultiScale(np.asarray(grey), scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
        return [tuple(round(v / scale) for v in box) for box in (found if len(found) else [])]

    return detect


def _blur(values: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma))
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    padded = np.pad(values, radius, mode="reflect")
    rows = np.apply_along_axis(np.convolve, 0, padded, kernel, "valid")
    return np.apply_along_axis(np.convolve, 1, rows, kernel, "valid")


def saliency_map(img: Image.Image, side: int = _SALIENCY_SIDE) -> tuple[np.ndarray, float]:
    """Spectral-residual saliency (Hou & Zhang 2007) of a small grey copy; returns (map, copy/original scale)."""
    grey = to_rgb(img).convert("L")
    scale = side / max(grey.size)
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    values = np.asarray(grey.resize(size, Image.Resampling.BOX), dtype=np.float64)
    spectrum = np.fft.fft2(values)
    log_amplitude = np.log(np.abs(spectrum) + 1e-8)
    local_mean = sum(np.roll(log_amplitude, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    residual = np.exp(log_amplitude - local_mean + 1j * np.angle(spectrum))
    return _blur(np.abs(np.fft.ifft2(residual)) ** 2, sigma=2.5), scale


def salient_point(img: Image.Image) -> tuple[float, float] | None:
    """Centroid of the strongest saliency in image coordinates, or None when nothing stands out."""
    values, scale = saliency_map(img)
    if values.max() < _SALIENCY_MIN_PEAK * values.mean():
        return None
    weights = np.where(values >= 0.5 * values.max(), values, 0.0)
    ys, xs = np.mgrid[0:values.shape[0], 0:values.shape[1]]
    total = weights.sum()
    # +0.5: pixel centres, so a point maps back to the middle of the pixels it stands for
    return ((weights * xs).sum() / total + 0.5) / scale, ((weights * ys).sum() / total + 0.5) / scale


@dataclass(frozen=True)
class Focus:
    x: float
    y: float
    source: str  # "face", "saliency" or "centre"
    box: Box | None = None  # region to keep whole (the faces)


def _face_region(faces: list[Box], max_w: float, max_h: float) -> Box:
    """All faces together when they fit in the largest window, else the biggest face."""
    left, top = min(f[0] for f in faces), min(f[1] for f in faces)
    right, bottom = max(f[0] + f[2] for f in faces), max(f[1] + f[3] for f in faces)
    if right - left <= max_w and bottom - top <= max_h:
        return left, top, right - left, bottom - top
    return max(faces, key=lambda f: f[2] * f[3])


def find_focus(img: Image.Image, target: tuple[int, int], detector: Detector | None, saliency: bool = True) -> Focus:
    """Where to centre the crop of `img`: faces, else the salient region (if enabled), else the centre."""
    faces = detector(img) if detector is not None else []
    if faces:
        max_w, max_h = _largest_window(img.size, target)
        box = _face_region(list(faces), max_w, max_h)
        return Focus(box[0] + box[2] / 2, box[1] + box[3] / 2, "face", box)
    point = salient_point(img) if saliency else None
    if point is not None:
        return Focus(point[0], point[1], "saliency")
    return Focus(img.width / 2, img.height / 2, "centre")


# ---------------------------------------------------------------------------------------------- geometry

def _largest_window(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float]:
    aspect = target[0] / target[1]
    width = min(size[0], size[1] * aspect)
    return width, width / aspect


def crop_window(size: tuple[int, int], target: tuple[int, int], focus: Focus,
                face_zoom: float | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the crop: the target aspect ratio, as large as the image allows (or
    `face_zoom` × the face box's longer side across its shorter side), centred on the focus and shifted only as
    far as needed to stay inside the image. A face box no larger than the window always ends up inside it."""
    width, height = _largest_window(size, target)
    if face_zoom and focus.box is not None:
        aspect = target[0] / target[1]
        short = max(focus.box[2], focus.box[3]) * face_zoom
        zoomed_w = short * aspect if aspect >= 1 else short
        if zoomed_w < width:
            width, height = zoomed_w, zoomed_w / aspect
    width_px, height_px = max(1, round(width)), max(1, round(height))
    left = min(max(round(focus.x - width_px / 2), 0), size[0] - width_px)
    top = min(max(round(focus.y - height_px / 2), 0), size[1] - height_px)
    return left, top, left + width_px, top + height_px


def crop_to_target(img: Image.Image, window: tuple[int, int, int, int], target: tuple[int, int]) -> Image.Image:
    """Cut `window` out of `img` and resize it to `target` with Lanczos (up or down)."""
    cut = img.crop(window)
    return cut if cut.size == target else cut.resize(target, Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------- repeats

def repeats_for_steps(steps: int, epochs: int, images: int, batch_size: int = 1) -> tuple[int, str]:
    """The seed tutorials' formula repeats = steps × batch / (epochs × images), rounded (at least 1), and the
    arithmetic as one printable line."""
    if min(steps, epochs, images, batch_size) < 1:
        raise PrepareError(f"steps, epochs, images and batch size must be at least 1 (got {steps}, {epochs}, "
                           f"{images}, {batch_size})")
    exact = steps * batch_size / (epochs * images)
    repeats = max(1, math.floor(exact + 0.5))
    batch = f" x batch {batch_size}" if batch_size != 1 else ""
    total = repeats * images * epochs // batch_size
    line = (f"repeats = {steps} steps{batch} / ({epochs} epochs x {images} images) = {exact:.2f} -> {repeats} "
            f"(then {images} images x {repeats} repeats{' / batch ' + str(batch_size) if batch else ''} "
            f"x {epochs} epochs = {total} steps)")
    return repeats, line


# ---------------------------------------------------------------------------------------------- the dataset

@dataclass(frozen=True)
class PrepareOptions:
    width: int = 512
    height: int = 512
    focus: str = "auto"  # auto: faces when OpenCV is installed, else saliency
    face_zoom: float | None = None
    flip: bool = False
    image_format: str = "png"
    caption_ext: str = ".txt"

    def __post_init__(self) -> None:
        if self.width < 8 or self.height < 8:
            raise PrepareError(f"target size {self.width}x{self.height} is too small")
        if self.focus not in FOCUS_MODES:
            raise PrepareError(f"--focus {self.focus!r} is not one of {', '.join(FOCUS_MODES)}")
        if self.image_format not in IMAGE_FORMATS:
            raise PrepareError(f"--format {self.image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
        if self.face_zoom is not None and self.face_zoom < 1:
            raise PrepareError(f"--face-zoom must be at least 1 (the face must fit), got {self.face_zoom}")


@dataclass
class PreparedImage:
    source: Path
    outputs: list[Path]
    focus: Focus
    window: tuple[int, int, int, int]
    upscale: float  # > 1 when the crop window was smaller than the target


@dataclass
class PrepareReport:
    folder: Path
    repeats: int
    repeats_line: str
    images: list[PreparedImage] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        outputs = sum(len(item.outputs) for item in self.images)
        sources = Counter(item.focus.source for item in self.images)
        focus = ", ".join(f"{n} {s}" for s, n in sorted(sources.items())) or "none"
        lines = [f"{outputs} images written to {self.folder} from {len(self.images)} sources (focus: {focus})",
                 self.repeats_line]
        upscaled = [item for item in self.images if item.upscale > 1.0]
        if upscaled:
            worst = max(upscaled, key=lambda item: item.upscale)
            lines.append(f"{len(upscaled)} images were smaller than the target and upscaled with Lanczos "
                         f"(most: {worst.source.name}, {worst.upscale:.1f}x); above 2x they look soft")
        lines += [f"failed: {path}: {reason}" for path, reason in self.failed]
        lines += [f"note: {note}" for note in self.notes]
        return lines


def _choose_detector(focus: str, notes: list[str]) -> Detector | None:
    if focus in ("saliency", "centre"):
        return None
    try:
        return haar_face_detector()
    except PrepareError as exc:
        if focus == "face":
            raise
        notes.append(f"face detection off, using saliency: {exc}")
        return None


def _source_images(src: Path) -> list[Path]:
    if not src.is_dir():
        raise PrepareError(f"source folder {src} does not exist" if not src.exists() else f"{src} is not a folder")
    images = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise PrepareError(f"no images directly in {src} (supported: {' '.join(IMAGE_EXTENSIONS)})")
    return images


def _check_output(out: Path, name: str) -> None:
    if not name.strip() or re.search(r"[\\/]", name):
        raise PrepareError(f"--name {name!r} must be a non-empty folder name without slashes")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output {out} is a file; pass a folder")
    if out.is_dir():
        clash = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(rf"\d+_{re.escape(name.strip())}", p.name)]
        if clash:
            raise PrepareError(f"{clash[0]} already exists; choose another output folder or --name, or remove it "
                               "(prepare never writes into an existing dataset folder)")


def _unique_stem(stem: str, used: set[str], flip: bool) -> str:
    """`stem`, or `stem_2`, ... so that no two outputs (flipped copies included) share a name."""
    def names(base: str) -> set[str]:
        return {base.lower(), f"{base}_flip".lower()} if flip else {base.lower()}

    candidate, n = stem, 2
    while names(candidate) & used:
        candidate, n = f"{stem}_{n}", n + 1
    used.update(names(candidate))
    return candidate


def _check_repeat_args(repeats: int | None, steps: int | None, epochs: int | None, batch_size: int) -> None:
    if repeats is not None and (steps is not None or epochs is not None):
        raise PrepareError("give either --repeats or --steps with --epochs, not both")
    if (steps is None) != (epochs is None):
        raise PrepareError("--steps and --epochs go together: repeats = steps / (epochs x images)")
    if repeats is not None and repeats < 1:
        raise PrepareError(f"--repeats must be at least 1, got {repeats}")
    if steps is not None:
        repeats_for_steps(steps, epochs, 1, batch_size)  # validates before any image is processed


def _decide_repeats(repeats: int | None, steps: int | None, epochs: int | None, images: int,
                    batch_size: int) -> tuple[int, str]:
    if repeats is not None:
        return repeats, f"repeats = {repeats}"
    if steps is not None:
        return repeats_for_steps(steps, epochs, images, batch_size)
    return 10, "repeats = 10 (default; set --repeats, or --steps and --epochs)"


def _save(img: Image.Image, path: Path, image_format: str) -> None:
    if image_format == "jpg":
        img.save(path, quality=95, subsampling=0)
    else:
        img.save(path)


def _prepare_one(source: Path, staging: Path, stem: str, caption: Path | None, options: PrepareOptions,
                 detector: Detector | None) -> PreparedImage:
    target = (options.width, options.height)
    img = load_image(source)
    focus = find_focus(img, target, detector, saliency=options.focus != "centre")
    window = crop_window(img.size, target, focus, options.face_zoom)
    result = crop_to_target(img, window, target)
    suffix = IMAGE_FORMATS[options.image_format]
    variants = [(stem, result)] + ([(f"{stem}_flip", result.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
                                   if options.flip else [])
    outputs = []
    for out_stem, pixels in variants:
        path = staging / f"{out_stem}{suffix}"
        _save(pixels, path, options.image_format)
        outputs.append(path)
        if caption is not None:
            shutil.copyfile(caption, staging / f"{out_stem}{options.caption_ext}")
    upscale = max(options.width / (window[2] - window[0]), options.height / (window[3] - window[1]))
    return PreparedImage(source, outputs, focus, window, upscale)


def prepare_dataset(src: Path, out: Path, name: str, options: PrepareOptions, repeats: int | None = None,
                    steps: int | None = None, epochs: int | None = None, batch_size: int = 1,
                    detector: Detector | None = None, progress: bool = True) -> PrepareReport:
    """Crop every image directly in `src` into `<out>/<repeats>_<name>/` (captions copied along).

    Give `repeats`, or `steps` and `epochs` to compute it from the number of images written (flipped copies
    count). `detector` overrides the face detector chosen by `options.focus` (tests inject one).
    """
    src, out = Path(src), Path(out)
    options = replace(options, caption_ext=normalise_extension(options.caption_ext))
    _check_repeat_args(repeats, steps, epochs, batch_size)
    sources = _source_images(src)
    _check_output(out, name)
    notes: list[str] = []
    if detector is None:
        detector = _choose_detector(options.focus, notes)
    captions = caption_paths(sources, options.caption_ext)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".prepare-{os.getpid()}-{name.strip()}"
    staging.mkdir()
    try:
        report = PrepareReport(out, 0, "", notes=notes)
        used: set[str] = set()
        for source in tqdm(sources, unit="img", disable=not progress, dynamic_ncols=True):
            try:
                caption = captions[source] if captions[source].is_file() else None
                report.images.append(_prepare_one(source, staging, _unique_stem(source.stem, used, options.flip), caption,
                                                  options, detector))
            except IMAGE_ERRORS as exc:
                report.failed.append((source, str(exc)))
        written = sum(len(item.outputs) for item in report.images)
        if not written:
            raise PrepareError(f"no image in {src} could be prepared: " + "; ".join(r for _, r in report.failed))
        report.repeats, report.repeats_line = _decide_repeats(repeats, steps, epochs, written, batch_size)
        report.folder = out / f"{report.repeats}_{name.strip()}"
        if report.folder.exists():
            raise PrepareError(f"{report.folder} appeared while preparing; remove it or choose another --name")
        os.rename(staging, report.folder)
        for item in report.images:
            item.outputs = [report.folder / path.name for path in item.outputs]
        return report
    finally:
        if staging.exists():
            shutil.rmtree(staging)
