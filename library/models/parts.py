"""The pieces of a loaded base model, and the noise schedulers built from its scheduler config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from library.models.families import ModelFamily


@dataclass
class ModelParts:
    """A base model: its family, one tokenizer and text encoder per family slot, VAE, UNet and the training
    noise scheduler (prediction_type matches v_prediction)."""

    family: ModelFamily
    tokenizers: list
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: DDPMScheduler
    v_prediction: bool
    source: str  # what was loaded, e.g. "builtin:tiny-sd15" or a file name
    # modules applied to the model through hooks rather than held in it (hypernetworks): sampling switches them
    # to eval mode with the model's own modules
    adapters: list[torch.nn.Module] = field(default_factory=list)

    @property
    def tokenizer(self):
        """The first tokenizer (the only one before SDXL)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (the only one before SDXL)."""
        return self.text_encoders[0]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for every released SD model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def native_size(self) -> int:
        """The square size the model generates at by default (diffusers' rule: UNet sample size × VAE factor):
        512 for SD1.5, 768 for SD2-768, 64 for the built-in tiny models."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def networks(self) -> list[torch.nn.Module]:
        """Every module with weights: text encoders, VAE, UNet."""
        return [*self.text_encoders, self.vae, self.unet]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ModelParts":
        """Move (and optionally cast) every network in place; returns self."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kwargs:
            for module in self.networks():
                # diffusers' ModelMixin.to warns on every dtype cast (even with nothing to keep in fp32).
                torch.nn.Module.to(module, **kwargs)
        return self

    def release_vae(self, keep_encoder: bool = False) -> None:
        """Free the VAE's weights once nothing will run it (its config stays readable); `keep_encoder` keeps
        what encoding needs (encoder and quant_conv), freeing only the decoder side."""
        freed = [self.vae.decoder, self.vae.post_quant_conv] if keep_encoder else [self.vae]
        for module in freed:
            if module is not None:  # a VAE without post_quant_conv (use_post_quant_conv = false) has None here
                torch.nn.Module.to(module, "meta")

    def pipeline(self, scheduler: Any = None):
        """A sampling pipeline sharing these modules (no safety checker); DDIM unless ``scheduler`` is given."""
        return self.family.pipeline(self, scheduler or sampling_scheduler(self.noise_scheduler))


def training_scheduler(config: Mapping[str, Any], v_prediction: bool) -> DDPMScheduler:
    """DDPM noise scheduler from a scheduler config (of any scheduler class) with the given prediction type."""
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    prediction = "v_prediction" if v_prediction else "epsilon"
    return DDPMScheduler.from_config(settings, prediction_type=prediction, clip_sample=False)


def sampling_scheduler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM sampler with the training scheduler's betas and prediction type (SD's usual sampler settings)."""
    return DDIMScheduler.from_config(noise_scheduler.config, set_alpha_to_one=False, steps_offset=1)
