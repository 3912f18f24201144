"""Measurements several test files share."""
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from library.data.batches import SampleGeometry
from library.data.buckets import upright_size
from library.training.loss import fixed_denoising_loss
from library.data.images import cover_crop, load_image, resize_and_crop, to_tensor
from library.data.latent_cache import encode_distribution
from library.data.sources import encode_latents

TIMESTEPS = [100, 300, 500, 700, 900]


def training_set_loss(parts, train_dir: Path, prompt: Callable[[str], str] = str, latent_mean: bool = False,
                      size: int = 64) -> float:
    """Denoising loss on every image under `train_dir` with its caption (through `prompt`), at fixed timesteps
    and noise: lower means the model (with whatever add-on it carries) learnt these images better.
    latent_mean: use the VAE's mean instead of one seeded sample (textual inversion's "deterministic")."""
    images = sorted(p for p in Path(train_dir).rglob("*") if p.suffix in (".png", ".jpg"))
    pixels = torch.stack([to_tensor(resize_and_crop(load_image(p), size, size)) for p in images])
    if latent_mean:
        latents = encode_distribution(parts.vae, pixels)[0] * parts.vae.config.scaling_factor
    else:
        latents = encode_latents(parts.vae, pixels, torch.Generator().manual_seed(0))
    prompts = [prompt(p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]
    with torch.no_grad():  # through the family: SDXL adds its pooled text and the images' size ids
        sizes = [upright_size(p) for p in images]
        batch = SimpleNamespace(geometry=[SampleGeometry(s, cover_crop(*s, size, size), (size, size)) for s in sizes])
        conditioning = parts.family.conditioning(parts.family.encode_text(parts, prompts, 1), batch)
    return fixed_denoising_loss(parts.unet, parts.noise_scheduler, latents, conditioning, parts.v_prediction,
                                timesteps=TIMESTEPS, seed=123)


SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sample_dataset" / "train"


def write_run_config(tmp: Path, body: str, train: Path | None = None, model: str = "builtin:tiny-sd15") -> Path:
    """A config on a built-in tiny model and a copy of the bundled sample images, with `body` (TOML sections
    after [model]; "{train}" and "{tmp}" are filled in). Sections the body leaves out get test defaults."""
    import shutil

    if train is None:
        train = tmp / "train"
        if not train.exists():
            shutil.copytree(SAMPLES, train)
    text = body.replace("{train}", train.as_posix()).replace("{tmp}", tmp.as_posix())
    defaults = {"[dataset]": f'[dataset]\ntrain_dir = "{train.as_posix()}"\nresolution = 64\n',
                "[train]": "[train]\nmax_steps = 4\nbatch_size = 2\nseed = 3\n",
                "[save]": f'[save]\noutput_dir = "{(tmp / "out").as_posix()}"\nname = "t"\n',
                "[logging]": f'[logging]\nlog_dir = "{(tmp / "logs").as_posix()}"\n'}
    extra = "".join(block for header, block in defaults.items() if header not in text)
    path = tmp / "run.toml"
    path.write_text(f'[model]\npath = "{model}"\n' + extra + text, encoding="utf-8")
    return path


def resolved_run(recipe, tmp: Path, body: str = "", overrides: tuple[str, ...] = (),
                 model: str = "builtin:tiny-sd15"):
    """(config, ResolvedRun) through the run step users go through, without loading a model."""
    from library.recipes.resolve import resolve
    from library.recipes.run import read_config

    config = read_config(write_run_config(tmp, body, model=model), list(overrides), recipe)
    return config, resolve(config, recipe)
