"""The run's denoising objective, built once from [train] and the model: how the latents are noised (noise,
offsets, pyramid noise, input perturbation, timestep range, zero terminal SNR) and how the prediction is scored
(loss type and δ, pixel weights, per-sample weights), in sd-scripts' order (train_network.py `process_batch`).
The loop calls `noised` and `loss`; the maths are the small functions in noise.py and loss.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from library.config.schema import TrainSection
from library.data.batches import Batch
from library.errors import UserError
from library.training.distributed import Share
from library.training.loss import (debiased_weights, huber_c, min_snr_weights, per_sample_loss,
                                   pixel_weighted_loss, scale_v_pred_like_noise_weights, target_for,
                                   v_pred_like_weights)
from library.training.noise import (offset_noise, perturbed_noise, pyramid_noise, sample_timesteps,
                                    zero_terminal_snr_scheduler)


class TrainingOptionError(UserError, ValueError):
    """A [train] option the loaded model cannot use (known only once its prediction type is)."""


@dataclass
class Noised:
    """One step's model input and what scores it."""

    noisy: torch.Tensor  # the latents noised at `timesteps`
    noise: torch.Tensor  # the noise the target is made from (unperturbed by ip_noise_gamma)
    timesteps: torch.Tensor


def prediction_problems(train: TrainSection, v_prediction: bool) -> list[str]:
    """[train] options that contradict the model's prediction type (found when the model has loaded)."""
    problems = []
    if train.v_pred_like_loss and v_prediction:
        problems.append("train.v_pred_like_loss is for ε-prediction models and this model predicts v "
                        "(sd-scripts refuses it too): remove it")
    if train.scale_v_pred_loss_like_noise_pred and not v_prediction:
        problems.append("train.scale_v_pred_loss_like_noise_pred is for v-prediction models and this model "
                        "predicts ε: remove it")
    return problems


class Objective:
    """Noise and loss of one run. `scheduler`: the model's training scheduler (left unchanged: samplers share
    it); with zero_terminal_snr the latents are noised on a rescaled copy, while the SNR weights keep the
    original schedule's SNR (as sd-scripts, whose cached SNR is computed before the rescaling)."""

    def __init__(self, train: TrainSection, prior_loss_weight: float, scheduler: DDPMScheduler, v_prediction: bool):
        if problems := prediction_problems(train, v_prediction):
            raise TrainingOptionError("\n".join(problems))
        self.train = train
        self.prior_loss_weight = prior_loss_weight
        self.snr_scheduler = scheduler
        self.scheduler = zero_terminal_snr_scheduler(scheduler) if train.zero_terminal_snr else scheduler
        self.v_prediction = v_prediction

    def notes(self) -> list[str]:
        """Lines printed before training about options that may not do what the user expects."""
        if self.train.zero_terminal_snr and not self.v_prediction:
            return ["note: train.zero_terminal_snr trains the last timestep on pure noise, which an ε-prediction "
                    "model cannot predict from; it is meant for v-prediction models (sd-scripts warns too)"]
        return []

    def noised(self, latents: torch.Tensor, generator: torch.Generator, share: Share | None = None) -> Noised:
        """Noise, timesteps and noisy latents for a step, every draw from the step's CPU generator. `share`: the
        latents are these rows of a bigger batch (a data-parallel process's): every draw is made for the whole
        batch and cut to them, so each row gets what it gets in one process."""
        rows = slice(None) if share is None or share.whole else share.rows
        shape = latents.shape if share is None else (share.total, *latents.shape[1:])
        on_cpu = None
        if self.train.noise_offset:  # adaptive_noise_scale reads the latents (a device-to-host copy: only then)
            on_cpu = latents.detach().cpu()
            if rows != slice(None):  # the other processes' rows: any values, the scale is per row
                on_cpu = torch.zeros(shape, dtype=on_cpu.dtype).index_copy(0, torch.arange(share.start, share.stop),
                                                                          on_cpu)
        noise, timesteps, perturbed = self._draws(shape, on_cpu, generator)
        timesteps = timesteps[rows].to(latents.device)
        noise = noise[rows].to(latents.device, latents.dtype)
        applied = noise if perturbed is None else perturbed[rows].to(latents.device, latents.dtype)
        return Noised(self.scheduler.add_noise(latents, applied, timesteps), noise, timesteps)

    def _draws(self, shape: tuple[int, ...], latents: torch.Tensor | None, generator: torch.Generator):
        """(noise, timesteps, perturbed noise or None) on the CPU for latents of `shape`, in sd-scripts' order of
        draws; `latents` (on the CPU) when noise_offset needs them."""
        train = self.train
        noise = torch.randn(shape, generator=generator)
        if train.noise_offset:
            noise = offset_noise(noise, latents, generator, train.noise_offset,
                                 train.noise_offset_random_strength, train.adaptive_noise_scale)
        if train.multires_noise_iterations:
            noise = pyramid_noise(noise, generator, train.multires_noise_iterations, train.multires_noise_discount)
        timesteps = sample_timesteps(shape[0], self.scheduler, generator, torch.device("cpu"),
                                     train.min_timestep, train.max_timestep)
        perturbed = None
        if train.ip_noise_gamma:
            perturbed = perturbed_noise(noise, generator, train.ip_noise_gamma, train.ip_noise_gamma_random_strength)
        return noise, timesteps, perturbed

    def loss(self, prediction: torch.Tensor, latents: torch.Tensor, noised: Noised, batch: Batch,
             pixel_weight: torch.Tensor | None = None, share: Share | None = None) -> torch.Tensor:
        """The batch's loss: the element-wise loss (times the pixel weights, e.g. loss masks) averaged per
        sample, times the per-sample weights (regularisation images' prior_loss_weight, the folder's
        loss_weight, then the SNR-based weights in sd-scripts' order), averaged over the batch. For a `share` of
        a batch: summed and divided by the whole batch's size, so the processes' losses add up to the mean."""
        train, timesteps = self.train, noised.timesteps
        target = target_for(self.scheduler, latents, noised.noise, timesteps, self.v_prediction)
        c = None
        if train.loss_type in ("huber", "smooth_l1"):
            c = huber_c(train.huber_schedule, train.huber_c, train.huber_scale, timesteps, self.scheduler)
        if pixel_weight is None:
            losses = per_sample_loss(prediction, target, train.loss_type, c)
        else:
            losses = pixel_weighted_loss(prediction, target, pixel_weight, train.loss_type, c)
        device = losses.device
        weights = torch.where(batch.is_reg, self.prior_loss_weight, 1.0).to(device)
        if batch.sample_weights is not None:
            weights = weights * torch.tensor(batch.sample_weights, dtype=weights.dtype, device=device)
        if self._snr_weighted():
            weights = weights * self.snr_weights(timesteps).to(device)
        if share is not None and not share.whole:
            return (losses * weights).sum() / share.total
        return (losses * weights).mean()

    def _snr_weighted(self) -> bool:
        train = self.train
        return bool(train.min_snr_gamma or train.scale_v_pred_loss_like_noise_pred or train.v_pred_like_loss
                    or train.debiased_estimation_loss)

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The product of the SNR-based per-sample weights, applied in sd-scripts' order: min-SNR γ, v-pred
        scaled like noise-pred, v-prediction-like loss, debiased estimation."""
        train, scheduler = self.train, self.snr_scheduler
        weights = torch.ones(timesteps.shape, dtype=torch.float32)
        if train.min_snr_gamma:
            weights = weights * min_snr_weights(scheduler, timesteps, train.min_snr_gamma, self.v_prediction).cpu()
        snr = compute_snr(scheduler, timesteps).float().cpu()
        if train.scale_v_pred_loss_like_noise_pred:
            weights = weights * scale_v_pred_like_noise_weights(snr)
        if train.v_pred_like_loss:
            weights = weights * v_pred_like_weights(snr, train.v_pred_like_loss)
        if train.debiased_estimation_loss:
            weights = weights * debiased_weights(snr, self.v_prediction)
        return weights
