"""The noise and loss options as sd-scripts defines them, checked on their formulas: zero terminal SNR, pyramid
noise, offsets, input perturbation, timestep ranges, Huber/smooth-L1 and their δ schedules, the SNR weights; and
the run's Objective, which with every option off computes exactly what the loop always did."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from library.config.schema import TrainSection
from library.data.batches import Batch
from library.training.loss import (debiased_weights, elementwise_loss, huber_c, min_snr_weights, per_sample_loss,
                                   scale_v_pred_like_noise_weights, v_pred_like_weights)
from library.training.noise import (offset_noise, perturbed_noise, pyramid_noise, sample_timesteps,
                                    zero_terminal_snr_scheduler)
from library.training.objective import Objective, TrainingOptionError


def sd_scheduler(prediction: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, prediction_type=prediction)


def train_section(**keys) -> TrainSection:
    return TrainSection(max_steps=1, **keys)


def test_zero_terminal_snr_makes_the_last_alpha_bar_zero_and_leaves_the_shared_scheduler_alone():
    scheduler = sd_scheduler()
    fixed = zero_terminal_snr_scheduler(scheduler)
    assert fixed.alphas_cumprod[-1].item() == 0.0
    assert scheduler.alphas_cumprod[-1].item() > 0.004  # SD's own schedule ends at ᾱ ≈ 0.0047
    assert fixed.alphas_cumprod[0].item() == pytest.approx(scheduler.alphas_cumprod[0].item(), rel=1e-5)
    # Lin et al.: √ᾱ is shifted and scaled linearly, so the ratio of the differences is constant
    old, new = scheduler.alphas_cumprod.sqrt(), fixed.alphas_cumprod.sqrt()
    slope = (new[0] - new[500]) / (old[0] - old[500])
    assert ((new[0] - new[900]) / (old[0] - old[900])).item() == pytest.approx(slope.item(), rel=1e-4)


def test_huber_equals_l2_for_small_residuals_and_is_linear_for_large_ones():
    c = torch.tensor([0.1])
    small = torch.full((1, 1, 2, 2), 1e-3)
    zero = torch.zeros_like(small)
    assert torch.allclose(elementwise_loss(small, zero, "huber", c), elementwise_loss(small, zero, "l2"), rtol=1e-3)
    large = torch.full((1, 1, 2, 2), 50.0)
    huber = elementwise_loss(large, zero, "huber", c)
    assert torch.allclose(huber, 2 * 0.1 * 50.0 - 2 * 0.1**2 * torch.ones_like(huber), rtol=1e-4)  # 2c|d| − 2c²
    doubled = elementwise_loss(2 * large, zero, "huber", c)
    assert torch.allclose(doubled - huber, torch.full_like(huber, 2 * 0.1 * 50.0), rtol=1e-4)  # slope 2c
    smooth = elementwise_loss(small, zero, "smooth_l1", c)
    assert torch.allclose(smooth, small**2 / 0.1, rtol=1e-3)  # ≈ d²/c
    assert torch.allclose(elementwise_loss(large, zero, "smooth_l1", c), 2 * large - 2 * 0.1, rtol=1e-4)
    assert torch.equal(elementwise_loss(large, zero, "l1"), large)


def test_huber_delta_schedules():
    scheduler = sd_scheduler()
    steps = torch.tensor([0, 500, 999])
    assert torch.allclose(huber_c("constant", 0.1, 2.0, steps, scheduler), torch.full((3,), 0.2))
    exponential = huber_c("exponential", 0.1, 2.0, torch.tensor([0, 1000]), scheduler)
    assert exponential.tolist() == pytest.approx([2.0, 0.2], rel=1e-5)  # scale at t=0, c·scale at t=1000
    snr = huber_c("snr", 0.1, 1.0, steps, scheduler)
    alpha_bar = scheduler.alphas_cumprod[500].double()
    sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
    assert snr[1].item() == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-5)
    assert snr[0] > snr[1] > snr[2] > 0.1  # large δ (L2-like) at low noise, δ → c at high noise
    terminal = huber_c("snr", 0.1, 1.0, torch.tensor([999]), zero_terminal_snr_scheduler(scheduler))
    assert terminal.item() == pytest.approx(0.1)  # σ = ∞ where ᾱ = 0


def test_snr_weights_follow_sd_scripts_formulas():
    snr = torch.tensor([0.01, 1.0, 4.0, 5000.0])
    capped = torch.tensor([0.01, 1.0, 4.0, 1000.0])
    assert torch.allclose(debiased_weights(snr, False), 1 / capped.sqrt())
    assert torch.allclose(debiased_weights(snr, True), 1 / (capped + 1))
    assert torch.allclose(v_pred_like_weights(snr, 0.2), 1 + 0.2 * (capped + 1) / capped)
    assert torch.allclose(scale_v_pred_like_noise_weights(snr), capped / (capped + 1))
    scheduler = sd_scheduler()
    steps = torch.tensor([10, 900])
    from diffusers.training_utils import compute_snr
    raw = compute_snr(scheduler, steps)
    assert torch.allclose(min_snr_weights(scheduler, steps, 5.0, True), torch.clamp(raw, max=5) / (raw + 1))


def test_pyramid_noise_has_unit_std_and_low_frequencies():
    generator = torch.Generator().manual_seed(0)
    white = torch.randn((4, 4, 64, 64), generator=generator)
    pyramid = pyramid_noise(white, generator, iterations=6, discount=0.3)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(pyramid.mean().item()) < 0.1

    def neighbour_correlation(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()

    strong = pyramid_noise(white, torch.Generator().manual_seed(1), iterations=6, discount=0.8)
    assert abs(neighbour_correlation(white)) < 0.01
    # the upsampled coarse draws correlate neighbours, more with a larger discount (weight discount^i)
    assert 0.01 < neighbour_correlation(pyramid) < neighbour_correlation(strong)
    assert neighbour_correlation(strong) > 0.2


def test_offset_noise_and_perturbation_draw_as_sd_scripts():
    latents = torch.zeros(2, 4, 8, 8)
    base = torch.zeros(2, 4, 8, 8)
    shifted = offset_noise(base, latents, torch.Generator().manual_seed(1), 0.1)
    per_channel = shifted.mean(dim=(2, 3))
    assert torch.allclose(shifted, per_channel[..., None, None].expand_as(shifted))  # one constant per (b, c)
    expected = 0.1 * torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(shifted[:, :, :1, :1], expected)
    bright = torch.full((2, 4, 8, 8), 3.0)
    adaptive = offset_noise(base, bright, torch.Generator().manual_seed(1), 0.1, adaptive_scale=0.5)
    assert torch.allclose(adaptive[:, :, :1, :1], (0.1 + 0.5 * 3.0) / 0.1 * expected)
    generator = torch.Generator().manual_seed(2)
    random_strength = offset_noise(base, latents, generator, 0.1, random_strength=True)
    generator = torch.Generator().manual_seed(2)
    strength = torch.rand(1, generator=generator).item() * 0.1
    assert torch.allclose(random_strength[:, :, :1, :1], strength * torch.randn((2, 4, 1, 1), generator=generator))
    perturbed = perturbed_noise(base, torch.Generator().manual_seed(3), 0.1)
    assert torch.allclose(perturbed, 0.1 * torch.randn(base.shape, generator=torch.Generator().manual_seed(3)))


def test_timesteps_stay_in_their_range():
    steps = sample_timesteps(5000, sd_scheduler(), torch.Generator().manual_seed(0), torch.device("cpu"), 200, 300)
    assert steps.min().item() == 200 and steps.max().item() == 299  # max is exclusive, as in sd-scripts


def batch_of(n: int, reg=(), weights=None) -> Batch:
    from pathlib import Path

    from library.data.folders import ImageItem
    items = [ImageItem(Path(f"{i}.png"), "", False, 1, i in reg, 0) for i in range(n)]
    return Batch(items, list(range(n)), [""] * n, [False] * n, sample_weights=weights)


def test_objective_with_options_off_is_what_the_loop_always_computed():
    scheduler = sd_scheduler()
    objective = Objective(train_section(noise_offset=0.05), 0.7, scheduler, v_prediction=False)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noised = objective.noised(latents, torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    noise = torch.randn(latents.shape, generator=generator)
    noise += 0.05 * torch.randn((3, 4, 1, 1), generator=generator)
    steps = torch.randint(0, 1000, (3,), generator=generator)
    assert torch.equal(noised.noise, noise) and torch.equal(noised.timesteps, steps)
    assert torch.equal(noised.noisy, scheduler.add_noise(latents, noise, steps))
    prediction = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    batch = batch_of(3, reg=(1,))
    loss = objective.loss(prediction, latents, noised, batch)
    expected = (per_sample_loss(prediction, noise) * torch.tensor([1.0, 0.7, 1.0])).mean()
    assert torch.equal(loss, expected)


def test_objective_weights_samples_and_perturbs_only_the_input():
    scheduler = sd_scheduler()
    objective = Objective(train_section(ip_noise_gamma=0.1, debiased_estimation_loss=True, min_snr_gamma=5.0),
                          1.0, scheduler, v_prediction=False)
    latents = torch.zeros(2, 4, 8, 8)
    noised = objective.noised(latents, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    clean = torch.randn(latents.shape, generator=generator)
    steps = torch.randint(0, 1000, (2,), generator=generator)
    extra = torch.randn(latents.shape, generator=generator)
    assert torch.equal(noised.noise, clean)  # the target's noise is the clean one
    assert torch.allclose(noised.noisy, scheduler.add_noise(latents, clean + 0.1 * extra, steps))
    prediction = torch.zeros(2, 4, 8, 8)
    loss = objective.loss(prediction, latents, noised, batch_of(2, weights=(2.0, 0.5)))
    from diffusers.training_utils import compute_snr
    snr = compute_snr(scheduler, steps)
    weights = torch.tensor([2.0, 0.5]) * torch.clamp(snr, max=5) / snr / torch.sqrt(torch.clamp(snr, max=1000))
    assert loss.item() == pytest.approx((per_sample_loss(prediction, clean) * weights).mean().item(), rel=1e-5)


def test_prediction_type_options_are_refused_for_the_other_type():
    with pytest.raises(TrainingOptionError, match="v_pred_like_loss"):
        Objective(train_section(v_pred_like_loss=0.1), 1.0, sd_scheduler("v_prediction"), v_prediction=True)
    with pytest.raises(TrainingOptionError, match="scale_v_pred_loss_like_noise_pred"):
        Objective(train_section(scale_v_pred_loss_like_noise_pred=True), 1.0, sd_scheduler(), v_prediction=False)


def test_zero_terminal_snr_noises_on_the_fixed_schedule_but_weighs_with_the_original_snr():
    scheduler = sd_scheduler("v_prediction")
    objective = Objective(train_section(zero_terminal_snr=True, min_snr_gamma=5.0, min_timestep=999), 1.0,
                          scheduler, v_prediction=True)
    latents = torch.ones(1, 4, 8, 8)
    noised = objective.noised(latents, torch.Generator().manual_seed(0))
    assert noised.timesteps.item() == 999
    assert torch.allclose(noised.noisy, noised.noise)  # ᾱ = 0: pure noise, no trace of the latents
    weight = objective.snr_weights(noised.timesteps)
    assert torch.isfinite(weight).all() and weight.item() > 0  # SNR of the original schedule: never 0/0
