"""The denoising objective: noise, targets (epsilon or v), the element-wise loss (L2, L1, Huber, smooth L1 with a
constant or scheduled δ, as sd-scripts' `conditional_loss`), and the per-sample weights sd-scripts applies after
the spatial mean (min-SNR γ, v-prediction-like loss, debiased estimation)."""
from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from library.models.conditioning import Conditioning

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CAP = 1000.0  # sd-scripts clamps the SNR here for the v-prediction-like and debiased weights


def make_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, drawn on the CPU generator so runs reproduce across devices.
    `offset` adds a per-channel constant (noise offset) so the model can learn very dark/bright images."""
    noise = torch.randn(latents.shape, generator=generator)
    if offset:
        noise += offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    return noise.to(latents.device, latents.dtype)


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


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """sd-scripts' `conditional_loss` with reduction "none", in fp32. With d = prediction − target and the
    per-sample δ `huber_c` [B]: l2 d²; l1 |d|; huber 2δ(√(d²+δ²) − δ) (≈ d² for |d| ≪ δ, ≈ 2δ|d| beyond);
    smooth_l1 2(√(d²+δ²) − δ) (≈ d²/δ, then ≈ 2|d|). Both Huber forms are the pseudo-Huber loss."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(prediction, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1") or huber_c is None:
        raise ValueError(f"loss type {loss_type!r} (with δ {huber_c}) is not one of {LOSS_TYPES}")
    c = huber_c.to(prediction.device, torch.float32).view(-1, *([1] * (prediction.dim() - 1)))
    pseudo = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo


def huber_c(schedule: str, c: float, scale: float, timesteps: torch.Tensor, scheduler: DDPMScheduler
            ) -> torch.Tensor:
    """sd-scripts' per-sample Huber δ [B]: "constant" c·scale; "exponential" exp(−αt)·scale with
    α = −ln(c)/1000 (scale at t = 0, c·scale at t = 1000); "snr" (1 − c)/(1 + σ_t)² + c with
    σ_t = √((1 − ᾱ_t)/ᾱ_t) from the schedule the latents are noised with (scale does not apply there)."""
    t = timesteps.detach().cpu()
    if schedule == "constant":
        return torch.full(t.shape, c * scale, dtype=torch.float32)
    if schedule == "exponential":
        alpha = -math.log(c) / 1000
        return torch.exp(-alpha * t.float()) * scale
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod[t].double()
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5  # inf where ᾱ = 0 (zero terminal SNR): δ = c
        return ((1 - c) / (1 + sigmas) ** 2 + c).float()
    raise ValueError(f"huber schedule {schedule!r} is not one of {HUBER_SCHEDULES}")


def pixel_weighted_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        loss_type: str = "l2", c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss with a per-pixel weight map [B, 1 or C, h, w] at latent resolution (a loss mask, PNG
    alpha), not renormalised: as in sd-scripts, a half-masked image contributes about half the loss."""
    if weight.shape[0] != prediction.shape[0] or weight.shape[-2:] != prediction.shape[-2:]:
        raise ValueError(f"loss weight map {tuple(weight.shape)} does not match the latents {tuple(prediction.shape)}")
    loss = elementwise_loss(prediction, target, loss_type, c)
    loss = loss * weight.to(loss.device, torch.float32)
    return loss.mean(dim=list(range(1, loss.dim())))


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    c: torch.Tensor | None = None) -> torch.Tensor:
    """The element-wise loss averaged per sample, in fp32 whatever the autocast dtype."""
    loss = elementwise_loss(prediction, target, loss_type, c)
    return loss.mean(dim=list(range(1, loss.dim())))


def v_pred_like_weights(snr: torch.Tensor, strength: float) -> torch.Tensor:
    """sd-scripts' --v_pred_like_loss for ε models: loss + strength · loss / (snr/(snr+1)), i.e. the factor
    1 + strength·(snr+1)/snr with the SNR capped at 1000."""
    snr = torch.clamp(snr.float(), max=SNR_CAP)
    return 1 + strength * (snr + 1) / snr


def scale_v_pred_like_noise_weights(snr: torch.Tensor) -> torch.Tensor:
    """sd-scripts' --scale_v_pred_loss_like_noise_pred for v models: snr/(snr+1), the SNR capped at 1000."""
    snr = torch.clamp(snr.float(), max=SNR_CAP)
    return snr / (snr + 1)


def debiased_weights(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """sd-scripts' --debiased_estimation_loss: 1/√snr for ε models, 1/(snr+1) for v models (newer sd-scripts);
    the SNR capped at 1000."""
    snr = torch.clamp(snr.float(), max=SNR_CAP)
    return 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)


@torch.no_grad()
def fixed_denoising_loss(unet, scheduler: DDPMScheduler, latents: torch.Tensor,
                         conditioning: torch.Tensor | Conditioning, v_prediction: bool, timesteps: list[int],
                         seed: int = 0) -> float:
    """Mean denoising loss at fixed timesteps with fixed noise: a like-for-like measure of how well a model
    (with whatever add-on is applied) reconstructs these latents. `conditioning`: the text hidden states, or
    a family's whole Conditioning (SDXL's pooled text and size ids too). Used by tests and benchmarks."""
    if isinstance(conditioning, torch.Tensor):
        conditioning = Conditioning(conditioning)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in timesteps:
        noise = make_noise(latents, generator)
        steps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        noisy = scheduler.add_noise(latents, noise, steps)
        prediction = unet(noisy, steps, **conditioning.unet_kwargs(latents.dtype)).sample
        target = target_for(scheduler, latents, noise, steps, v_prediction)
        total += per_sample_loss(prediction, target).mean().item()
    return total / len(timesteps)
