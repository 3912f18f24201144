"""Class images for DreamBooth's prior preservation: count what dreambooth.class_dir holds and generate the
missing ones with the base model before the dataset scan, so they join the run as regularisation images.

Generated files are named `kiln-class-NNNNN.png` (never a name already taken, so a user's images are never
overwritten), each written atomically with a caption file holding the class prompt. A later run counts them
and generates nothing; an interrupted generation resumes where it stopped, with the same images (each image's
seed derives from train.seed and its number).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from library.atomic import write_atomically
from library.data.batches import hash_ints
from library.data.images import IMAGE_EXTENSIONS
from library.training.device import resolve_device

if TYPE_CHECKING:  # the model libraries load only when images are generated
    from library.models.parts import ModelParts

GENERATED_PREFIX = "kiln-class-"
_SEED_SALT = 0x636C617373  # "class": keeps these seeds apart from the training-noise seeds


@dataclass(frozen=True)
class ClassImageStatus:
    folder: Path
    present: int  # images already in the folder, the user's and earlier generated ones
    wanted: int  # dreambooth.num_class_images

    @property
    def missing(self) -> int:
        return max(0, self.wanted - self.present)

    def line(self) -> str:
        if not self.missing:
            return f"class images: {self.present} in {self.folder} (dreambooth.num_class_images = {self.wanted}): " \
                   "none to generate"
        return (f"class images: {self.present} of {self.wanted} in {self.folder}; the {self.missing} missing "
                "will be generated with the base model before training")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_image_status(config) -> ClassImageStatus | None:
    """How many class images dreambooth.class_dir has and wants; None when generation is off."""
    db = config.dreambooth
    if not db.num_class_images:
        return None
    folder = Path(db.class_dir).expanduser()
    return ClassImageStatus(folder, len(_images_in(folder)), db.num_class_images)


def free_numbers(folder: Path, count: int) -> list[int]:
    """The lowest `count` numbers whose `kiln-class-NNNNN` name no file in `folder` uses yet."""
    taken = {p.stem for p in folder.iterdir()} if folder.is_dir() else set()
    numbers, n = [], 0
    while len(numbers) < count:
        if f"{GENERATED_PREFIX}{n:05d}" not in taken:
            numbers.append(n)
        n += 1
    return numbers




def _autocast(device: torch.device, mixed_precision: str):
    """Half-precision compute for sampling; the weights themselves stay as they are (training continues on
    this very model, so it must not be rounded here). GPUs sample in bf16 where they can: its fp32 range
    keeps the VAE decode from overflowing into black images, as fp16 may. The CPU uses bf16 only when the
    run does (train.mixed_precision = "bf16")."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor) -> list:
    """PIL images from latents as the pipeline decodes them, but never black: under half-precision autocast
    the original SDXL VAE overflows fp16 (inf/NaN pixels; bf16 has fp32's range and does not), so a decode
    that is not finite runs again in fp32 with autocast off."""
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    if not torch.isfinite(pixels).all():
        with torch.autocast(vae.device.type, enabled=False):
            pixels = vae.float().decode(latents.float() / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")


@torch.no_grad()
def generate_class_images(parts: "ModelParts", config, status: ClassImageStatus) -> list[Path]:
    """Generate status.missing images from dreambooth.class_prompt into status.folder (square, at
    dataset.resolution); returns the new image paths. The processes of a data-parallel run share the work (each
    image's seed comes from its number, whichever process draws it)."""
    from library.training.distributed import current_processes

    db, ds = config.dreambooth, config.dataset
    if not status.missing:
        return []
    status.folder.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.train.device)
    parts.to(device)
    pipe = parts.pipeline()
    pipe.set_progress_bar_config(disable=True)
    numbers = free_numbers(status.folder, status.missing)
    processes = current_processes()
    processes.barrier()  # every process has counted the folder before any writes to it
    mine = numbers[processes.rank::processes.count]
    caption_extension = ds.caption_extension if ds.caption_extension.startswith(".") else f".{ds.caption_extension}"
    with tqdm(total=len(mine), desc="generating class images", unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(mine), db.class_batch_size):
            chunk = mine[start:start + db.class_batch_size]
            generators = [torch.Generator().manual_seed(hash_ints(config.train.seed, n, _SEED_SALT)) for n in chunk]
            with _autocast(device, config.train.mixed_precision):
                latents = pipe(
                    prompt=[db.class_prompt] * len(chunk),
                    negative_prompt=[db.class_negative_prompt] * len(chunk) if db.class_negative_prompt else None,
                    num_inference_steps=db.class_sampling_steps, guidance_scale=db.class_guidance_scale,
                    height=ds.resolution, width=ds.resolution, generator=generators, output_type="latent",
                    clip_skip=config.model.clip_skip - 1 or None,  # diffusers counts skipped layers from 0
                ).images
                images = decode_images(pipe, latents)
            for n, image in zip(chunk, images):
                stem = status.folder / f"{GENERATED_PREFIX}{n:05d}"
                caption = stem.with_suffix(caption_extension)
                write_atomically(caption, lambda p: p.write_text(db.class_prompt + "\n", encoding="utf-8"))
                # the image last: a counted image always has its caption
                write_atomically(stem.with_suffix(".png"), lambda p, im=image: im.save(p, format="PNG"))
                bar.update(1)
    processes.barrier()  # the others' images are written too
    return [status.folder / f"{GENERATED_PREFIX}{n:05d}.png" for n in numbers]
