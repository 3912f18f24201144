"""What bench_scripts.py trains on: the full-size SD1.5 single file (written once, seeded random weights), the
8-image dataset (written once) and each run's TOML config.

Everything lives under bench/.cache/ (git-ignored) and is reused while it is intact; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = BENCH / ".cache"
MODEL_NAME = "sd15-random-fp32.safetensors"
CONCEPT = "10_concept"  # 10 repeats: 8 images x 10 = 80 steps per epoch at batch size 1
IMAGES = 8
IMAGE_SIZE = 512
MODEL_SEED = 1234
MODEL_SOURCE = f"bench:sd15-random-seed{MODEL_SEED}"  # kiln.source in the file's metadata: marks our own file
TINY_MODEL = "builtin:tiny-sd15"
TI_NAME = "kilnbenchtok"  # the embedding's trigger word (not a word CLIP knows)


# ----------------------------------------------------------------------------------------- the model file


def model_file_problem(path: Path) -> str | None:
    """Why `path` is not a complete benchmark model file (None when it is): the safetensors header must parse,
    name our source, hold fp32 floats only, and the file must be exactly as long as the header says (a file
    cut short by a crash is rebuilt)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        return "not built yet"
    except (OSError, struct.error, ValueError) as err:
        return f"unreadable header ({err})"
    metadata = header.pop("__metadata__", {}) or {}
    if metadata.get("kiln.source") != MODEL_SOURCE:
        return f"kiln.source is {metadata.get('kiln.source')!r}, not {MODEL_SOURCE!r}"
    if not header or any(entry.get("dtype") in ("F16", "BF16", "F64") for entry in header.values()):
        return "not an fp32 file"  # floats only: the text encoder's position ids are int64 in every file
    expected = 8 + length + max(entry["data_offsets"][1] for entry in header.values())
    size = path.stat().st_size
    return None if size == expected else f"{size} bytes, the header describes {expected}"


def build_model_file(path: Path) -> None:
    """Build the full SD1.5 architecture (library/models/model_configs/sd1) with seeded random weights and
    write it as an original-layout fp32 single file with Kiln's own writer (atomically). Run in its own
    process (``bench_scripts.py --build-model``) so the parent never holds the 4 GiB model."""
    import torch

    from library.models.builtin import build_random
    from library.models.paths import CONFIG_ROOT
    from library.models.single_file import save_single_file

    parts = build_random(CONFIG_ROOT / "sd1", MODEL_SEED, MODEL_SOURCE, dtype=torch.float32)
    save_single_file(parts, path, torch.float32)


def ensure_model_file(path: Path) -> Path:
    """The benchmark's SD1.5 file, built first when it is missing or incomplete (about 4.3 GB, 20-60 s)."""
    problem = model_file_problem(path)
    if problem is None:
        return path
    print(f"building {path} ({problem}): full SD1.5 architecture, seeded random weights, "
          "fp32 single file ...", flush=True)
    need = 4_400_000_000
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(path.parent).free < need * 1.1:
        raise SystemExit(f"error: {path.parent} needs about {need / 1e9:.1f} GB free for the model file")
    code = subprocess.call([sys.executable, str(BENCH / "bench_scripts.py"), "--build-model", str(path)], cwd=REPO)
    if code != 0 or (problem := model_file_problem(path)) is not None:
        raise SystemExit(f"error: building {path} failed (exit code {code}; {problem})")
    return path


# ----------------------------------------------------------------------------------------- the dataset

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
_RGB = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 200), "yellow": (230, 210, 40),
        "purple": (130, 50, 160), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}


def _image(index: int):
    """One seeded synthetic image: a vertical gradient and a few filled shapes; and its caption."""
    from PIL import Image, ImageDraw

    rng = random.Random(MODEL_SEED + index)
    top, bottom = [rng.randrange(256) for _ in range(3)], [rng.randrange(256) for _ in range(3)]
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(IMAGE_SIZE):
        t = y / (IMAGE_SIZE - 1)
        draw.line([(0, y), (IMAGE_SIZE, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    colours = rng.sample(_COLOURS, 3)
    for colour in colours:
        x, y, r = rng.randrange(64, 448), rng.randrange(64, 448), rng.randrange(24, 120)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=_RGB[colour])
    return image, f"bench concept, {', '.join(f'{c} shape' for c in colours)}, gradient background"


def dataset_complete(folder: Path) -> bool:
    concept = folder / CONCEPT
    return (concept.is_dir() and len(list(concept.glob("*.txt"))) == IMAGES
            and len([p for p in concept.iterdir() if p.suffix in (".png", ".jpg")]) == IMAGES)


def ensure_dataset(folder: Path) -> Path:
    """<folder>/10_concept (bench/.cache/dataset by default): 8 seeded 512x512 images (PNG and JPEG, alternating) with .txt captions.
    Written to a scratch folder first and moved into place, so a crash never leaves half a dataset."""
    if dataset_complete(folder):
        return folder
    scratch = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    concept = scratch / CONCEPT
    concept.mkdir(parents=True)
    for index in range(IMAGES):
        image, caption = _image(index)
        suffix = ".png" if index % 2 == 0 else ".jpg"
        image.save(concept / f"img_{index + 1:02d}{suffix}", quality=92)
        (concept / f"img_{index + 1:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(scratch, folder)
    return folder


# ----------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BenchConfig:
    """One measured setting: resolution, precision ("fp32" = train.mixed_precision "no"), gradient
    checkpointing, channels-last and torch.compile of the UNet."""

    resolution: int
    precision: str
    checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        flags = (("gc", self.checkpointing), ("cl", self.channels_last), ("compile", self.compile))
        return f"{self.resolution}-{self.precision}" + "".join(f"-{name}" for name, on in flags if on)

    @classmethod
    def parse(cls, text: str) -> "BenchConfig":
        """"256-fp32", "512-bf16", "256-fp32-gc" (gradient checkpointing), "-cl" (train.channels_last),
        "-compile" (train.torch_compile), in any combination; ValueError naming the problem."""
        parts = text.strip().lower().split("-")
        flags = {name: name in parts[2:] for name in ("gc", "cl", "compile")}
        unknown = [part for part in parts[2:] if part not in flags]
        if unknown or len(parts) < 2 or not parts[0].isdigit() or parts[1] not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"{text!r}: write RESOLUTION-PRECISION[-gc][-cl][-compile], e.g. 256-fp32, 512-bf16, "
                             "256-fp32-gc")
        resolution = int(parts[0])
        if resolution < 64 or resolution % 64:
            raise ValueError(f"{text!r}: the resolution must be a multiple of 64")
        return cls(resolution, parts[1], flags["gc"], flags["cl"], flags["compile"])


SCRIPTS = {"lora": "train_lora", "ti": "train_textual_inversion", "dreambooth": "train_dreambooth"}

_SCRIPT_SECTIONS = {
    # the reference setting: LoRA rank 16 / alpha 8 on the UNet and the text encoder, AdamW
    "lora": """
[network]
rank = 16
alpha = 8
train_unet = true
train_text_encoder = true
""",
    # one vector; no previews, log copies or CSV (they are not per-step work, and previews of a full model
    # take minutes on a CPU)
    "ti": f"""
[embedding]
name = "{TI_NAME}"
init_text = "shape"
vectors = 1
[ti_log]
save_embedding_every = 0
create_image_every = 0
write_csv_every = 0
""",
    # the UNet only (DreamBooth's default), no class images
    "dreambooth": """
[dreambooth]
train_text_encoder = false
""",
}


def write_config(folder: Path, script: str, setting: BenchConfig, model: str, dataset: Path, steps: int,
                 threads: int, device: str) -> Path:
    """The TOML a user would write for this run; outputs and logs go inside `folder`."""
    mixed = "no" if setting.precision == "fp32" else setting.precision
    text = f"""# written by bench/bench_scripts.py
[model]
path = "{Path(model).as_posix() if not model.startswith('builtin:') else model}"
[dataset]
train_dir = "{dataset.as_posix()}"
resolution = {setting.resolution}
caption_extension = ".txt"
cache_latents = "memory"
[optimizer]
name = "AdamW"
[train]
max_steps = {steps}
batch_size = 1
mixed_precision = "{mixed}"
gradient_checkpointing = {str(setting.checkpointing).lower()}
channels_last = {str(setting.channels_last).lower()}
torch_compile = {str(setting.compile).lower()}
attention = "sdpa"
num_threads = {threads}
device = "{device}"
seed = 42
[save]
output_dir = "{(folder / 'out').as_posix()}"
{'' if script == 'ti' else 'name = "bench"'}
overwrite = true
[logging]
log_dir = "{(folder / 'logs').as_posix()}"
{_SCRIPT_SECTIONS[script]}"""
    path = folder / f"{script}-{setting.label}.toml"
    path.write_text(text, encoding="utf-8")
    return path
