"""Preview images: real diffusion sampling with the model's own noise schedule and a sampler chosen by name,
conditioned exactly as training conditions (same tokenizer window and clip_skip), so a preview shows what the
trained add-on does to this model. `SamplingHooks` samples during training (every N steps/epochs, before
training) without changing what training computes: RNG states, module modes, devices and dtypes are restored."""
from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)
from PIL import Image, PngImagePlugin

from library.atomic import write_atomically
from library.models.parts import ModelParts
from library.sampling.prompt_file import PromptOptions, SampleSpec, canonical_sampler, parse_prompt_lines, read_prompt_file
from library.training.hooks import CombinedHooks, TrainerHooks
from library.training.trainer import LoopParts, Trainer


# ---------------------------------------------------------------------------------------------- samplers


def make_sampler(name: str, noise_scheduler):
    """A diffusers scheduler for `name` (see prompt_file.SAMPLERS) built from the model's noise-scheduler config,
    so betas and prediction type (epsilon / v) are the model's."""
    key = canonical_sampler(name)
    config = noise_scheduler.config
    if key == "ddim":
        return DDIMScheduler.from_config(config, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    if key == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if key == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=key.endswith("karras"))


# ---------------------------------------------------------------------------------------------- state


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Switch modules to eval (no dropout) and restore every submodule's own mode afterwards (a model may
    be partly in train mode, e.g. a frozen text encoder inside a training model)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def preserved_rng():
    """Restore the torch (CPU and every CUDA device), Python and NumPy random states on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    python, numpy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        np.random.set_state(numpy)


def _placement(*modules: torch.nn.Module) -> list[tuple[str, torch.device, torch.dtype]]:
    return [(name, t.device, t.dtype) for module in modules
            for name, t in [*module.named_parameters(), *module.named_buffers()]]


# ---------------------------------------------------------------------------------------------- one image


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from latents. A half-precision VAE overflows on some latents (the black previews):
    when its output is not finite, decode again with the VAE temporarily in fp32 (and cast back, exactly)."""
    scaled = latents / vae.config.scaling_factor
    device_type = vae.device.type
    with torch.autocast(device_type, enabled=False):  # the loop may sample inside accelerate's autocast
        pixels = vae.decode(scaled.to(vae.device, vae.dtype)).sample
        if vae.dtype != torch.float32 and not torch.isfinite(pixels).all():
            dtype = vae.dtype
            torch.nn.Module.to(vae, torch.float32)
            try:
                pixels = vae.decode(scaled.to(vae.device, torch.float32)).sample
            finally:
                torch.nn.Module.to(vae, dtype)
    return pixels.float()


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] → an RGB image."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _encoded(parts: ModelParts, text: str, clip_skip: int, max_token_length: int):
    encoding = parts.family.encode_text(parts, [text], clip_skip, max_token_length)
    dtype = parts.unet.dtype
    encoding.hidden_states = encoding.hidden_states.to(dtype)
    encoding.pooled = None if encoding.pooled is None else encoding.pooled.to(dtype)
    return encoding


@torch.no_grad()
def generate(parts: ModelParts, spec: SampleSpec, clip_skip: int = 1, max_token_length: int = 75) -> Image.Image:
    """Sample one image for `spec`. Prompts go in as given: expand multi-vector names before calling.
    Leaves RNG states and every module's mode as they were."""
    if spec.width % 8 or spec.height % 8:
        raise ValueError(f"preview size {spec.width}x{spec.height} must be a multiple of 8")
    with preserved_rng(), eval_mode(*parts.networks(), *parts.adapters):
        # embeddings computed here, not by the pipeline: diffusers would re-expand multi-vector names and
        # apply its own clip_skip convention
        embeds = parts.family.prompt_embeds(_encoded(parts, spec.prompt, clip_skip, max_token_length),
                                            _encoded(parts, spec.negative_prompt, clip_skip, max_token_length))
        pipe = parts.pipeline(make_sampler(spec.sampler, parts.noise_scheduler))
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(**embeds, width=spec.width,
                       height=spec.height, num_inference_steps=spec.steps, guidance_scale=spec.cfg_scale,
                       generator=torch.Generator().manual_seed(spec.seed), output_type="latent").images
        pixels = decode_latents(parts.vae, latents)
    return to_image(pixels[0])


def save_sample(image: Image.Image, path: Path, spec: SampleSpec, extra: dict[str, str] | None = None) -> None:
    """PNG with A1111's `parameters` text (PNG Info shows the settings) and any extra tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", spec.infotext())
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    write_atomically(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


# ---------------------------------------------------------------------------------------------- during training


def sample_specs(section, resolution: int, train_seed: int,
                 prompt_transform: Callable[[str], str] | None = None) -> list[SampleSpec]:
    """The run's preview specs from a config's [sample] section: inline prompts then the prompt file, each
    line's options over the section's defaults. Prompt i without --d gets seed (sample.seed or train.seed) + i,
    so every preview of a prompt uses the same noise and previews compare across steps."""
    options: list[PromptOptions] = parse_prompt_lines(list(section.prompts), "sample.prompts")
    if section.prompt_file:
        options += read_prompt_file(section.prompt_file)
    base_seed = train_seed if section.seed is None else section.seed
    transform = prompt_transform or (lambda text: text)
    specs = []
    for index, option in enumerate(options):
        default = SampleSpec("", section.negative_prompt, section.width or resolution,
                             section.height or resolution, section.steps, section.cfg_scale,
                             base_seed + index, canonical_sampler(section.sampler))
        spec = dataclasses.replace(default, **option.given())
        specs.append(dataclasses.replace(spec, prompt=transform(spec.prompt),
                                         negative_prompt=transform(spec.negative_prompt)))
    return specs


def sample_file_name(name: str, step: int, epoch: int, index: int) -> str:
    """`<name>-s000100-e000002-00.png`: step, epoch (1-based; 0 before training) and prompt index."""
    return f"{name}-s{step:06d}-e{epoch:06d}-{index:02d}.png"


class SamplingHooks(TrainerHooks):
    """Preview images during training, per the config's [sample] section, written to
    <save.output_dir>/samples/ and to TensorBoard (tag samples/NN, at the step)."""

    needs_vae = True
    writes_outputs = True  # data-parallel: the main process alone writes them

    def __init__(self, config, parts: ModelParts, specs: list[SampleSpec]):
        self.section = config.sample
        self.parts = parts
        self.specs = specs
        self.name = config.save.name
        self.clip_skip = config.model.clip_skip
        self.max_token_length = config.train.max_token_length
        self.folder = Path(config.save.output_dir) / "samples"
        self._last_step: int | None = None

    def before_train(self, trainer: Trainer, loop: LoopParts) -> None:
        if self.section.before_training and trainer.progress.global_step < trainer.plan.total_steps:
            step = trainer.progress.global_step
            self.sample(trainer, loop, step, trainer.progress.epoch if step else 0)

    def after_step(self, trainer: Trainer, loop: LoopParts, loss, lrs, batch) -> None:
        every, step = self.section.every_n_steps, trainer.progress.global_step
        if every and step % every == 0:
            self.sample(trainer, loop, step, trainer.progress.epoch + 1)

    def after_epoch(self, trainer: Trainer, loop: LoopParts, epoch: int) -> None:
        every = self.section.every_n_epochs
        if every and epoch % every == 0 and self._last_step != trainer.progress.global_step:
            self.sample(trainer, loop, trainer.progress.global_step, epoch)

    def sample(self, trainer: Trainer, loop: LoopParts, step: int, epoch: int) -> list[Path]:
        """Render every spec; returns the files written."""
        self._last_step = step
        modules = self.parts.networks()
        placement = _placement(*modules)
        writer = getattr(getattr(trainer, "log", None), "writer", None)
        paths = []
        for index, spec in enumerate(self.specs):
            with loop.accelerator.autocast():  # the frozen weights are in the training compute dtype
                image = generate(self.parts, spec, self.clip_skip, self.max_token_length)
            path = self.folder / sample_file_name(self.name, step, epoch, index)
            save_sample(image, path, spec, {"kiln_step": str(step), "kiln_epoch": str(epoch)})
            paths.append(path)
            if writer is not None:
                writer.add_image(f"samples/{index:02d}", np.asarray(image), step, dataformats="HWC")
        if writer is not None:
            writer.flush()
        if _placement(*modules) != placement:
            raise RuntimeError("sampling moved or cast model weights; training state would differ")
        message = f"samples: {len(paths)} image(s) at step {step} in {self.folder}"
        (trainer.log.write if getattr(trainer, "log", None) else print)(message)
        return paths


def with_sampling(hooks: TrainerHooks | None, config, parts: ModelParts,
                  prompt_transform: Callable[[str], str] | None = None) -> TrainerHooks | None:
    """`hooks` plus preview sampling when the config's [sample] section asks for any; the scripts' one line.
    `prompt_transform` rewrites each prompt (textual inversion spells out multi-vector names)."""
    section = getattr(config, "sample", None)
    if section is None or not (section.every_n_steps or section.every_n_epochs or section.before_training):
        return hooks
    specs = sample_specs(section, config.dataset.resolution, config.train.seed, prompt_transform)
    if not specs:
        return hooks
    sampling = SamplingHooks(config, parts, specs)
    return sampling if hooks is None else CombinedHooks(hooks, sampling)
