"""The one training loop every trainer shares. Scripts decide WHAT is trained (a `Trainable`); this module
decides HOW: noise, loss, accumulation, mixed precision, checkpoints, resume, Ctrl-C, progress and logs."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from library.models.attention import select_attention
from library.training.checkpoints import (Progress, epoch_file, final_file, load_state, prune_saved, save_state,
                                 state_dir_for, step_file)
from library.config.schema import RunConfig, TrainSection
from library.training.loss import make_noise, min_snr_weights, per_sample_loss, sample_timesteps, target_for
from library.training.logs import RunLog
from library.models.loading import ModelParts
from library.training.optimizers import build_optimizer, uses_relative_step
from library.training.plan import TrainingPlan
from library.training.schedules import build_scheduler, current_lrs, resolve_warmup_steps
from library.data.sources import Batch, ConditioningSource, LatentSource, TrainingData, hash_ints

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Trainable(Protocol):
    """What a script trains. The loop only needs these."""

    artifact_suffix: str
    trains_text_encoder: bool

    def param_groups(self) -> list[dict]:
        """[{"params": [...], "lr": float, "name": "unet"}, ...]"""

    def set_train(self, training: bool) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, path: Path, progress: Progress) -> None:
        """Write the artifact users load (atomically)."""

    def after_backward(self) -> None:
        """Adjust gradients before the optimizer step (textual inversion masks rows here)."""


class TrainerHooks:
    """Optional extension points for a script (textual inversion's A1111 log folder uses them). The base
    class does nothing; override what you need."""

    def configure(self, trainer: "Trainer", loop: "LoopParts") -> None:
        """After set-up, before a save.resume state loads: may replace loop.scheduler / loop.latents, load an
        optimizer state or set trainer.progress to start mid-run."""

    def after_step(self, trainer: "Trainer", loop: "LoopParts", loss: float, lrs: dict[str, float],
                   batch: Batch) -> None:
        """After each optimizer step (trainer.progress already counts it). `lrs`: the rates that step used;
        `batch`: the last batch of its accumulation group."""

    def after_resume(self, trainer: "Trainer", loop: "LoopParts") -> None:
        """After a save.resume state has loaded (trainer.progress is the resumed step), before training goes on:
        whatever after_step changes at a given step must already hold when a run resumes past it."""

    def before_train(self, trainer: "Trainer", loop: "LoopParts") -> None:
        """After set-up and resume, right before the first step (trainer.log exists)."""

    def after_epoch(self, trainer: "Trainer", loop: "LoopParts", epoch: int) -> None:
        """After the last step of each complete epoch (also the run's last); `epoch`: epochs done, 1-based."""

    def after_train(self, trainer: "Trainer", loop: "LoopParts", final: Path) -> None:
        """After the final artifact is saved."""


class CombinedHooks(TrainerHooks):
    """Several hooks as one: each event goes to each hook in the order given (a script's own hooks first,
    so e.g. sampling sees what they changed)."""

    def __init__(self, *hooks: TrainerHooks | None):
        self.hooks = [hook for hook in hooks if hook is not None]

    def configure(self, trainer, loop) -> None:
        for hook in self.hooks:
            hook.configure(trainer, loop)

    def after_step(self, trainer, loop, loss, lrs, batch) -> None:
        for hook in self.hooks:
            hook.after_step(trainer, loop, loss, lrs, batch)

    def after_resume(self, trainer, loop) -> None:
        for hook in self.hooks:
            hook.after_resume(trainer, loop)

    def before_train(self, trainer, loop) -> None:
        for hook in self.hooks:
            hook.before_train(trainer, loop)

    def after_epoch(self, trainer, loop, epoch) -> None:
        for hook in self.hooks:
            hook.after_epoch(trainer, loop, epoch)

    def after_train(self, trainer, loop, final) -> None:
        for hook in self.hooks:
            hook.after_train(trainer, loop, final)


def pixel_weighted_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE with a per-pixel weight map [B, 1 or C, h, w] at latent resolution (e.g. PNG alpha)."""
    if weight.shape[0] != prediction.shape[0] or weight.shape[-2:] != prediction.shape[-2:]:
        raise ValueError(f"loss weight map {tuple(weight.shape)} does not match the latents {tuple(prediction.shape)}")
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    loss = loss * weight.to(loss.device, torch.float32)
    return loss.mean(dim=list(range(1, loss.dim())))


def resolve_device(train: TrainSection) -> torch.device:
    if train.device != "auto":
        return torch.device(train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def runtime_problems(train: TrainSection) -> list[str]:
    """Settings this machine cannot run, found before any model loads."""
    device = resolve_device(train)
    problems = []
    if train.device == "cuda" and not torch.cuda.is_available():
        problems.append("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    elif train.device == "mps" and not torch.backends.mps.is_available():
        problems.append("train.device = 'mps' but Apple's MPS backend is not available here; use 'auto' or 'cpu'")
    elif device.type == "cpu" and train.mixed_precision == "fp16":
        problems.append("train.mixed_precision = 'fp16' needs a GPU; on the CPU use 'bf16' or 'no'")
    return problems


@dataclass
class LoopParts:
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    latents: LatentSource
    weight_dtype: torch.dtype
    conditioning: ConditioningSource


class Trainer:
    """Runs one training: set up, loop, save. `train()` returns the final artifact's path."""

    def __init__(self, config: RunConfig, parts: ModelParts, trainable: Trainable, data: TrainingData,
                 plan: TrainingPlan, hooks: TrainerHooks | None = None):
        self.config = config
        self.parts = parts
        self.trainable = trainable
        self.data = data
        self.plan = plan
        self.output_dir = Path(config.save.output_dir)
        self.progress = Progress()
        self.hooks = hooks or TrainerHooks()
        self.log: RunLog | None = None  # while training: the progress bar and TensorBoard writer hooks may use
        self.saved: dict[str, list[Path]] = {"epoch": [], "step": []}  # this run's intermediates, for keep_last

    # ---------------------------------------------------------------- set-up
    def _setup(self) -> LoopParts:
        train = self.config.train
        # accelerate keeps process-wide state; a second run in one process (tests, notebooks) may change
        # mixed precision, which accelerate otherwise refuses
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=resolve_device(train).type == "cpu")
        device = accelerator.device
        weight_dtype = WEIGHT_DTYPES[train.mixed_precision]
        parts = self.parts
        # frozen weights in the compute dtype; trainable ones stay fp32 so small updates are not lost. Trainable
        # weights are never cast down first: a full fine-tune (DreamBooth) trains the models' own weights.
        trainable = [param for group in self.trainable.param_groups() for param in group["params"]]
        keep = {id(param) for param in trainable}
        for module in (parts.unet, parts.text_encoder):
            torch.nn.Module.to(module, device)
            for param in module.parameters():
                if id(param) not in keep:
                    param.data = param.data.to(weight_dtype)
        parts.vae.to(device, torch.float32)  # fp16 VAE encodes can overflow; it runs once per image when cached
        for param in trainable:
            param.data = param.data.to(device=device, dtype=torch.float32)  # tensors outside the models too
        print(select_attention([parts.unet], train.attention, device))
        if train.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if self.trainable.trains_text_encoder:
                encoder = parts.text_encoder  # transformers 5 renamed the method; 4.x readers keep the old one
                getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
        parts.vae.requires_grad_(False)

        opt = self.config.optimizer
        optimizer = build_optimizer(opt.name, self.trainable.param_groups(), opt.lr, opt.args)
        warmup = resolve_warmup_steps(self.plan.total_steps, opt.warmup_steps, opt.warmup_ratio)
        scheduler = build_scheduler(optimizer, opt.scheduler, self.plan.total_steps, warmup, opt.num_cycles,
                                    opt.power, relative_step=uses_relative_step(opt.name, opt.args))
        optimizer = accelerator.prepare(optimizer)
        latents = LatentSource(self.data, parts.vae, self.config.dataset.cache_latents, train.seed)
        conditioning = ConditioningSource(parts.tokenizer, parts.text_encoder, self.config.model.clip_skip,
                                          self.config.dataset.cache_text_encoder_outputs,
                                          self.trainable.trains_text_encoder)
        return LoopParts(accelerator, optimizer, scheduler, latents, weight_dtype, conditioning)

    def _resume(self, loop: LoopParts) -> None:
        folder = Path(self.config.save.resume)
        state = load_state(folder)
        self.trainable.load_state_dict(state.trainable)
        loop.optimizer.load_state_dict(state.optimizer)
        loop.scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None and loop.accelerator.scaler is not None:
            loop.accelerator.scaler.load_state_dict(state.scaler)
        self.progress = state.progress
        saved_total = state.extra.get("total_steps")
        shape = self._run_shape()
        changed = [f"{key} {state.extra[key]} → {shape[key]}" for key in shape
                   if key != "total_steps" and key in state.extra and state.extra[key] != shape[key]]
        if changed:
            raise ValueError(f"{folder} was saved by a run with other data or batching ({'; '.join(changed)}): "
                             "resuming would not continue its data order; restore those settings or start anew")
        if saved_total is not None and saved_total != self.plan.total_steps:
            print(f"note: the state was saved by a run planned for {saved_total} steps; this one plans "
                  f"{self.plan.total_steps}, so the LR schedule continues on the new length")
        print(f"resumed from {folder}: step {self.progress.global_step}, epoch {self.progress.epoch + 1}, "
              f"batch {self.progress.next_batch}")
        self.hooks.after_resume(self, loop)

    # ---------------------------------------------------------------- one step
    def _loss(self, loop: LoopParts, batch: Batch, epoch: int, step_seed: int) -> torch.Tensor:
        parts, train = self.parts, self.config.train
        device = loop.accelerator.device
        latents = loop.latents.latents(batch, epoch, step_seed).to(device, loop.weight_dtype)
        generator = torch.Generator().manual_seed(step_seed)
        noise = make_noise(latents, generator, train.noise_offset)
        timesteps = sample_timesteps(latents.shape[0], parts.noise_scheduler, generator, device)
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        with loop.accelerator.autocast():
            conditioning = loop.conditioning.encode(batch.captions, grad=self.trainable.trains_text_encoder)
            prediction = parts.unet(noisy, timesteps, conditioning.to(loop.weight_dtype)).sample
        target = target_for(parts.noise_scheduler, latents, noise, timesteps, parts.v_prediction)
        pixel_weight = getattr(batch, "loss_weight", None)  # a batch may carry a per-pixel weight map
        if pixel_weight is None:
            losses = per_sample_loss(prediction, target)
        else:
            losses = pixel_weighted_loss(prediction, target, pixel_weight)
        weights = torch.where(batch.is_reg, self.config.dataset.prior_loss_weight, 1.0).to(device)
        if train.min_snr_gamma:
            weights = weights * min_snr_weights(parts.noise_scheduler, timesteps, train.min_snr_gamma,
                                                parts.v_prediction).to(device)
        return (losses * weights).mean()

    def _optimizer_step(self, loop: LoopParts) -> None:
        params = [p for g in loop.optimizer.param_groups for p in g["params"]]  # not re-collected from the model
        if self.config.optimizer.max_grad_norm:
            loop.accelerator.clip_grad_norm_(params, self.config.optimizer.max_grad_norm)
        loop.optimizer.step()
        if not loop.optimizer.step_was_skipped:  # fp16 overflow skips a step; the schedule waits with it
            loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------- saving
    def _save(self, loop: LoopParts, artifact: Path, with_state: bool, kind: str | None = None) -> None:
        """Write the artifact (and state); `kind` "epoch"/"step" marks an intermediate that keep_last prunes."""
        self.trainable.save(artifact, self.progress)
        if with_state:
            save_state(state_dir_for(artifact), self.progress, self.trainable.state_dict(), loop.optimizer,
                       loop.scheduler, loop.accelerator.scaler, self._run_shape())
        if kind is not None:
            self.saved[kind].append(artifact)
            prune_saved(self.saved[kind], self.config.save.keep_last)

    def _run_shape(self) -> dict:
        """What a resumed run must share with this one for its data order and schedule to continue exactly."""
        train = self.config.train
        return {"total_steps": self.plan.total_steps, "seed": train.seed, "batch_size": train.batch_size,
                "gradient_accumulation_steps": train.gradient_accumulation_steps,
                "batches_per_epoch": self.plan.batches_per_epoch, "samples_per_epoch": self.plan.samples_per_epoch}

    def _save_if_due(self, loop: LoopParts, log: RunLog, epoch_done: bool) -> None:
        save, p = self.config.save, self.progress
        finished = p.global_step >= self.plan.total_steps
        if finished:
            return  # the final save follows
        suffix = self.trainable.artifact_suffix
        if epoch_done and save.every_n_epochs and p.epoch % save.every_n_epochs == 0:
            path, kind = epoch_file(self.output_dir, save.name, p.epoch, suffix), "epoch"
        elif not epoch_done and save.every_n_steps and p.global_step % save.every_n_steps == 0:
            path, kind = step_file(self.output_dir, save.name, p.global_step, suffix), "step"
        else:
            return
        self._save(loop, path, save.save_state, kind)
        log.write(f"saved {path}")

    def _save_interrupted(self, loop: LoopParts, log: RunLog | None) -> None:
        path = step_file(self.output_dir, self.config.save.name, self.progress.global_step,
                         self.trainable.artifact_suffix)
        self._save(loop, path, with_state=True)
        message = (f"\ninterrupted at step {self.progress.global_step}: saved {path} and its state.\n"
                   f"resume with: save.resume={state_dir_for(path)}")
        (log.write if log else print)(message)

    # ---------------------------------------------------------------- the loop
    def train(self) -> Path:
        layers = getattr(self.parts.text_encoder.config, "num_hidden_layers", None)
        if layers is not None and self.config.model.clip_skip > layers:
            print(f"error: model.clip_skip = {self.config.model.clip_skip} but the text encoder has {layers} layers",
                  file=sys.stderr)
            raise SystemExit(2)
        loop = self._setup()
        self.hooks.configure(self, loop)
        if self.config.save.resume:
            try:
                self._resume(loop)
            except ValueError as err:  # a state of another network/optimizer/data: say so, no traceback
                print(f"error: cannot resume from {self.config.save.resume}: {err}", file=sys.stderr)
                raise SystemExit(2) from None
        if self.progress.global_step >= self.plan.total_steps:
            print(f"the state is already at step {self.progress.global_step} of {self.plan.total_steps}: "
                  "nothing to train; raise train.max_steps / train.epochs to continue")
        try:
            loop.latents.fill()
        except KeyboardInterrupt:
            print("\ninterrupted while caching latents, before any training step: nothing to save")
            raise SystemExit(130) from None
        self.trainable.set_train(True)
        log = RunLog(self.config.logging.log_dir, self.config.save.name, self.plan.total_steps,
                     self.progress.global_step)
        self.log = log
        try:
            self.hooks.before_train(self, loop)
            self._epochs(loop, log)
        except KeyboardInterrupt:
            self._save_interrupted(loop, log)
            log.close()
            raise SystemExit(130) from None
        log.close()
        final = final_file(self.output_dir, self.config.save.name, self.trainable.artifact_suffix)
        self._save(loop, final, with_state=self.config.save.save_state)
        self.hooks.after_train(self, loop, final)
        print(f"saved {final}\nTensorBoard logs: {log.dir}")
        return final

    def _epochs(self, loop: LoopParts, log: RunLog) -> None:
        accumulation = self.config.train.gradient_accumulation_steps
        seed = self.config.train.seed
        for epoch in range(self.progress.epoch, self.plan.epochs):
            if self.progress.global_step >= self.plan.total_steps:
                return
            batches = self.data.epoch_batches(epoch)
            epoch_losses: list[float] = []
            group_loss = 0.0
            start = self.progress.next_batch
            for index in range(start, len(batches)):
                group_start = (index // accumulation) * accumulation
                group_size = min(accumulation, len(batches) - group_start)
                step_seed = hash_ints(seed, epoch, index)
                torch.manual_seed(step_seed)  # dropout inside the network draws from the global RNG
                batch = self.data.batch(epoch, batches[index])
                loss = self._loss(loop, batch, epoch, step_seed)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(self._nan_hint())
                loop.accelerator.backward(loss / group_size)
                self.trainable.after_backward()
                group_loss += loss.item() / group_size
                if index + 1 - group_start < group_size:
                    continue
                lrs = current_lrs(loop.scheduler, loop.optimizer)  # the rates this step uses, not the next
                self._optimizer_step(loop)
                self.progress = Progress(self.progress.global_step + 1, epoch, index + 1)
                log.step(self.progress.global_step, group_loss, lrs, epoch)
                self.hooks.after_step(self, loop, group_loss, lrs, batch)
                epoch_losses.append(group_loss)
                group_loss = 0.0
                self._save_if_due(loop, log, epoch_done=False)
                if self.progress.global_step >= self.plan.total_steps:
                    break
            if epoch_losses:
                log.epoch_end(epoch, sum(epoch_losses) / len(epoch_losses))
            if self.progress.epoch == epoch and self.progress.next_batch == len(batches):
                self.hooks.after_epoch(self, loop, epoch + 1)
                # a finished epoch counts as done even when it is the last (the final file's ss_epoch)
                self.progress = Progress(self.progress.global_step, epoch + 1, 0)
                self._save_if_due(loop, log, epoch_done=True)

    def _nan_hint(self) -> str:
        hint = f"the loss became NaN/inf at step {self.progress.global_step + 1}."
        if self.config.train.mixed_precision == "fp16":
            hint += " fp16 overflows easily: try train.mixed_precision = 'bf16' (or 'no'), or a lower optimizer.lr."
        else:
            hint += " Try a lower optimizer.lr, or check the images for corrupt data."
        return hint
