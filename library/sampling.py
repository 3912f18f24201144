"""Preview images during training: real diffusion sampling with the base model's own sampler (DDIM with the
model's betas and prediction type), conditioned exactly as training conditions (same tokenizer window and
clip_skip), so a preview shows what the trained add-on does to this model."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from library.conditioning import encode_text, tokenize
from library.models import ModelParts


@dataclass(frozen=True)
class SampleSpec:
    """One preview image. Field meanings follow A1111's txt2img (and kohya's --n/--w/--h/--s/--l/--d)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 0

    def infotext(self) -> str:
        """A1111's `parameters` text, so PNG Info in the WebUI shows how the image was made."""
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return (f"{self.prompt}{negative}\nSteps: {self.steps}, Sampler: DDIM, CFG scale: {self.cfg_scale:g}, "
                f"Seed: {self.seed}, Size: {self.width}x{self.height}")


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Switch modules to eval (no dropout) for sampling and restore each one's mode afterwards."""
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


def _embeds(parts: ModelParts, text: str, clip_skip: int) -> torch.Tensor:
    ids = tokenize(parts.tokenizer, [text])
    return encode_text(parts.text_encoder, ids, clip_skip).to(parts.unet.dtype)


@torch.no_grad()
def generate(parts: ModelParts, spec: SampleSpec, clip_skip: int = 1) -> Image.Image:
    """Sample one image for `spec`. Prompts go in as given: expand multi-vector names before calling."""
    if spec.width % 8 or spec.height % 8:
        raise ValueError(f"preview size {spec.width}x{spec.height} must be a multiple of 8")
    with eval_mode(parts.unet, parts.text_encoder):
        # embeddings computed here, not by the pipeline: diffusers would re-expand multi-vector names and
        # apply its own clip_skip convention
        positive = _embeds(parts, spec.prompt, clip_skip)
        negative = _embeds(parts, spec.negative_prompt, clip_skip)
        pipe = parts.pipeline()
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, width=spec.width,
                       height=spec.height, num_inference_steps=spec.steps, guidance_scale=spec.cfg_scale,
                       generator=torch.Generator().manual_seed(spec.seed), output_type="latent").images
        # decode in the VAE's own dtype (fp32 in training): an fp16/bf16 UNet's latents would otherwise
        # meet fp32 VAE weights, and fp16 VAE decodes are what turn previews black
        vae = parts.vae
        pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
