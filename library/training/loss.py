"""The denoising objective: noise, timesteps (for a batch, or a data-parallel process's rows of it), targets
(epsilon or v), min-SNR weighting, per-sample loss."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from library.training.distributed import Share


def make_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, drawn on the CPU generator so runs reproduce across devices.
    `offset` adds a per-channel constant (noise offset) so the model can learn very dark/bright images."""
    noise = torch.randn(latents.shape, generator=generator)
    if offset:
        noise += offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    return noise.to(latents.device, latents.dtype)


def sample_timesteps(batch: int, scheduler: DDPMScheduler, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    steps = scheduler.config.num_train_timesteps
    return torch.randint(0, steps, (batch,), generator=generator).to(device)


def batch_noise(latents: torch.Tensor, generator: torch.Generator, offset: float, scheduler,
                share: Share) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps for this process's rows, drawn for the whole batch and cut to them: each row gets the
    values it gets in a one-process run with the same batch."""
    if share.whole:
        noise = make_noise(latents, generator, offset)
        return noise, sample_timesteps(latents.shape[0], scheduler, generator, latents.device)
    whole = torch.empty((share.total, *latents.shape[1:]), dtype=latents.dtype)  # the shape the draws take
    noise = make_noise(whole, generator, offset)[share.rows].to(latents.device)
    return noise, sample_timesteps(share.total, scheduler, generator, latents.device)[share.rows]


def target_for(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """What the UNet should predict: the noise, or v = α·ε − σ·x₀ for v-prediction models."""
    if v_prediction:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float,
                    v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v."""
    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def pixel_weighted_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE with a per-pixel weight map [B, 1 or C, h, w] at latent resolution (e.g. PNG alpha)."""
    if weight.shape[0] != prediction.shape[0] or weight.shape[-2:] != prediction.shape[-2:]:
        raise ValueError(f"loss weight map {tuple(weight.shape)} does not match the latents {tuple(prediction.shape)}")
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    loss = loss * weight.to(loss.device, torch.float32)
    return loss.mean(dim=list(range(1, loss.dim())))


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32 whatever the autocast dtype."""
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    return loss.mean(dim=list(range(1, loss.dim())))


@torch.no_grad()
def fixed_denoising_loss(unet, scheduler: DDPMScheduler, latents: torch.Tensor, conditioning: torch.Tensor,
                         v_prediction: bool, timesteps: list[int], seed: int = 0) -> float:
    """Mean denoising loss at fixed timesteps with fixed noise: a like-for-like measure of how well a model
    (with whatever add-on is applied) reconstructs these latents. Used by tests and benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in timesteps:
        noise = make_noise(latents, generator)
        steps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        noisy = scheduler.add_noise(latents, noise, steps)
        prediction = unet(noisy, steps, conditioning).sample
        target = target_for(scheduler, latents, noise, steps, v_prediction)
        total += per_sample_loss(prediction, target).mean().item()
    return total / len(timesteps)
