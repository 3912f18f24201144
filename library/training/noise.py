"""The noise side of the denoising objective, as sd-scripts defines each option: offset noise (with random
strength and the adaptive scale), multi-resolution (pyramid) noise, input perturbation, timestep ranges and the
zero-terminal-SNR schedule. Every draw comes from the step's CPU generator, in a fixed order, and only when its
option is on, so a run without them draws exactly what it always did."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, generator: torch.Generator, offset: float,
                 random_strength: bool = False, adaptive_scale: float = 0.0) -> torch.Tensor:
    """sd-scripts' `apply_noise_offset`: add `strength · randn(B, C, 1, 1)`, where strength is `offset`, times
    rand(1) with `random_strength` (one number for the batch), plus `adaptive_scale · |mean_HW(latents)|` per
    (sample, channel), clamped at 0. `noise` and `latents` are on the CPU."""
    if random_strength:
        offset = torch.rand(1, generator=generator) * offset
    shape = (latents.shape[0], latents.shape[1], 1, 1)
    if adaptive_scale:
        strength = offset + adaptive_scale * latents.float().mean(dim=(2, 3), keepdim=True).abs()
        return noise + strength.clamp(min=0) * torch.randn(shape, generator=generator)
    return noise + offset * torch.randn(shape, generator=generator)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """sd-scripts' `pyramid_noise_like` (multires noise): for i = 0..iterations-1, a scale r ~ U[2, 4) and
    Gaussian noise at (H, W) / r^i, bilinearly upsampled and weighted discount^i, added to `noise` (i = 0 adds a
    second full-size draw); it stops once a side reaches 1. The sum is divided by its std over the whole batch."""
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    noise = noise.clone()
    for i in range(iterations):
        r = torch.rand(1, generator=generator).item() * 2 + 2
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        noise += upsample(torch.randn((batch, channels, h, w), generator=generator)) * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def perturbed_noise(noise: torch.Tensor, generator: torch.Generator, gamma: float,
                    random_strength: bool = False) -> torch.Tensor:
    """Input perturbation (sd-scripts' ip_noise_gamma, arXiv 2301.11706): the noise the latents are noised with
    is `noise + s · randn`, s = gamma (or rand(1) · gamma); the loss target keeps the unperturbed noise."""
    strength = torch.rand(1, generator=generator) * gamma if random_strength else gamma
    return noise + strength * torch.randn(noise.shape, generator=generator)


def sample_timesteps(batch: int, scheduler: DDPMScheduler, generator: torch.Generator, device: torch.device,
                     min_timestep: int = 0, max_timestep: int | None = None) -> torch.Tensor:
    """One timestep per sample, uniform in [min_timestep, max_timestep) (sd-scripts' range: max exclusive;
    None = the schedule's length)."""
    high = scheduler.config.num_train_timesteps if max_timestep is None else max_timestep
    return torch.randint(min_timestep, high, (batch,), generator=generator).to(device)


def zero_terminal_snr_scheduler(scheduler: DDPMScheduler) -> DDPMScheduler:
    """A copy of the training scheduler whose betas are rescaled to zero terminal SNR (Lin et al. 2023, Alg. 1;
    sd-scripts' --zero_terminal_snr, here diffusers' own implementation): the last ᾱ is exactly 0, so the final
    timestep is pure noise. The scheduler given (shared with the samplers) is left as it is."""
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)

