"""The one training loop every trainer shares. Recipes decide WHAT is trained (a `Trainable`); this module
decides HOW: noise, loss, accumulation, mixed precision, checkpoints, resume, Ctrl-C, progress and logs."""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from library.data.batches import Batch, hash_ints
from library.data.masks import MaskSource
from library.data.sources import ConditioningSource, LatentSource
from library.models.parts import ModelParts
from library.faults import fault_point
from library.training.checkpoints import Progress, load_state, save_state, state_dir_for
from library.training.device import use_device
from library.training.distributed import Share, current_processes, fill_latents, resume_note
from library.training.divergence import NanGuard
from library.training.hooks import TrainerHooks, hooks_for_process
from library.training.interrupts import StopRequests
from library.training.logs import RunLog, run_folder, tensorboard_command
from library.training.model_setup import (TrainingSetupError, check_clip_skip, optimizer_line, place_models,
                                          release_vae)
from library.training.ema import EMA, save_artifact
from library.training.objective import Objective
from library.training.precision import FusedBackward, allow_fp16_unscale
from library.training.optimizers import build_optimizer, uses_relative_step
from library.training.resolved import ResolvedRun
from library.training.run_summary import summary_path, write_run_summary
from library.training.saving import RunSaver, SaveFailed
from library.training.schedules import A1111Schedule, a1111_lambda_scheduler, build_scheduler, current_lrs
from library.training.trainable import StartPoint, Trainable


@dataclass
class LoopParts:
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    latents: LatentSource
    conditioning: ConditioningSource
    objective: Objective
    masks: MaskSource | None = None  # loss masks, when any folder has them
    ema: EMA | None = None  # the weights' moving average ([ema] enabled)
    fused: FusedBackward | None = None  # optimizer.fused_backward_pass: steps taken during backward


class Trainer:
    """Runs one training: set up, loop, save. `train()` returns the final artifact's path."""

    def __init__(self, run: ResolvedRun, parts: ModelParts, trainable: Trainable, hooks: TrainerHooks | None = None,
                 start: StartPoint | None = None):
        self.run = run
        self.config = run.config
        self.parts = parts
        self.trainable = trainable
        self.data = run.data
        self.plan = run.plan
        self.output_dir = Path(run.config.save.output_dir)
        self.start = start
        self.progress = start.progress if start else Progress()
        self.processes = current_processes()  # data-parallel: only the main one writes files and logs
        self.hooks = hooks_for_process(hooks, self.processes.is_main) or TrainerHooks()
        self.log: RunLog | None = None  # while training: the progress bar and TensorBoard writer hooks may use
        self.resumed_log_dir: str | None = None  # the TensorBoard folder a resumed state recorded
        self.stops = StopRequests(quiet=not self.processes.is_main)
        self.saver: RunSaver | None = None  # set once the loop's parts exist (train)
        train = run.config.train
        self.nan_guard = NanGuard(train.nan_policy, train.nan_skip_limit, run.lr_settings, train.mixed_precision)

    # ---------------------------------------------------------------- set-up
    def _schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        opt, total, start = self.config.optimizer, self.plan.total_steps, self.progress.global_step
        if self.run.lr_schedule is not None:
            return a1111_lambda_scheduler(optimizer, A1111Schedule(self.run.lr_schedule, total, start))
        scheduler = build_scheduler(optimizer, opt.scheduler, total, self.run.warmup_steps, opt.num_cycles,
                                    opt.power, relative_step=uses_relative_step(opt.name, opt.args))
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(start):  # a run that starts mid-schedule (an embedding continued from its step)
                scheduler.step()
        return scheduler

    def _setup(self) -> LoopParts:
        train = self.config.train
        # accelerate keeps process-wide state; a second run in one process (tests, notebooks) may change
        # mixed precision, which accelerate otherwise refuses. The processes of a data-parallel run keep the
        # process group they joined (library/training/distributed.py start_processes)
        AcceleratorState._reset_state(reset_partial_state=self.processes.count == 1)
        GradientState._reset_state()
        use_device(self.run.device)
        accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=self.run.device.type == "cpu")
        place_models(self.run, self.parts, self.trainable, accelerator.device)
        opt = self.config.optimizer
        optimizer = build_optimizer(opt.name, self.trainable.param_groups(), opt.lr, opt.args)
        if self.start is not None and self.start.optimizer_state is not None:
            names = [group.get("name") for group in optimizer.param_groups]
            optimizer.load_state_dict(self.start.optimizer_state)
            for group, name in zip(optimizer.param_groups, names):
                group["name"] = name  # a state written by another tool (A1111) has no group names
        scheduler = self._schedule(optimizer)
        print(optimizer_line(self.run, self.trainable, optimizer))
        fused = FusedBackward(optimizer, opt.max_grad_norm) if opt.fused_backward_pass else None
        optimizer = accelerator.prepare(optimizer)
        if train.full_fp16 and accelerator.scaler is not None:
            allow_fp16_unscale(accelerator.scaler)
        run, parts = self.run, self.parts
        latents = LatentSource(self.data, parts.vae, run.latent_mode, train.seed, run.latent_draw,
                               run.cache_dir, self.config.dataset.vae_batch_size)
        conditioning = ConditioningSource(parts, self.config.model.clip_skip, run.cache_text_encoder_outputs,
                                          self.trainable.trains_text_encoder, train.max_token_length)
        objective = Objective(train, self.config.dataset.prior_loss_weight, parts.noise_scheduler, parts.v_prediction)
        for line in objective.notes():
            print(line)
        masks = None
        if run.masks is not None:
            factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
            masks = MaskSource(self.data, run.masks, factor, run.cache_dir if run.latent_mode == "disk" else None)
        return LoopParts(accelerator, optimizer, scheduler, latents, conditioning, objective, masks, self._ema(),
                         fused)

    def _ema(self) -> EMA | None:
        ema = self.config.ema
        if not ema.enabled:
            return None
        params = [param for group in self.trainable.param_groups() for param in group["params"]]
        return EMA(params, ema.decay, ema.update_interval, ema.warmup, "cpu" if ema.device == "cpu" else None)

    def _resume(self, loop: LoopParts) -> None:
        folder = Path(self.config.save.resume)
        try:
            state = load_state(folder)
            self.trainable.load_state_dict(state.trainable)
            with loop.fused.fp32_state_loading() if loop.fused else contextlib.nullcontext():
                loop.optimizer.load_state_dict(state.optimizer)
            loop.scheduler.load_state_dict(state.scheduler)
        except (ValueError, KeyError, RuntimeError) as err:  # another network/optimizer, or a damaged file
            raise TrainingSetupError(f"cannot resume from {folder}: {str(err).splitlines()[0]}") from None
        if state.scaler is not None and loop.accelerator.scaler is not None:
            loop.accelerator.scaler.load_state_dict(state.scaler)
        if loop.ema is not None:
            loop.ema.reset()  # from the resumed weights, unless the state kept the average
            if state.ema is not None:
                loop.ema.load_state_dict(state.ema)
            else:
                print(f"note: {folder} holds no EMA of the weights (saved without [ema]): the average starts now")
        self.progress = state.progress
        self.resumed_log_dir = state.extra.get("tensorboard_dir")
        self.nan_guard.skipped = int(state.extra.get("nan_skipped", 0))
        saved_total = state.extra.get("total_steps")
        shape = self.run.run_shape()
        changed = [f"{key} {state.extra[key]} → {shape[key]}" for key in shape
                   if key != "total_steps" and key in state.extra and state.extra[key] != shape[key]]
        if changed:
            raise TrainingSetupError(
                f"cannot resume from {folder}: it was saved by a run with other data or batching "
                f"({'; '.join(changed)}): resuming would not continue its data order; restore those settings or "
                "start anew")
        if note := resume_note(state.extra.get("processes", 1), self.processes.count):
            print(note)
        if saved_total is not None and saved_total != self.plan.total_steps:
            print(f"note: the state was saved by a run planned for {saved_total} steps; this one plans "
                  f"{self.plan.total_steps}, so the LR schedule continues on the new length")
        print(f"resumed from {folder}: step {self.progress.global_step}, epoch {self.progress.epoch + 1}, "
              f"batch {self.progress.next_batch}")
        self.hooks.after_resume(self, loop)

    # ---------------------------------------------------------------- one step
    def _loss(self, loop: LoopParts, batch: Batch, epoch: int, step_seed: int,
              share: Share | None = None) -> torch.Tensor:
        """The loss of this process's rows of a batch: their mean, or their sum / the batch size when the batch is
        shared (the processes' parts then add up to the batch's mean). No `share`: the whole batch."""
        parts, dtype = self.parts, self.run.weight_dtype
        share = share or Share(0, len(batch.items), len(batch.items))
        latents = loop.latents.latents(batch, epoch, step_seed, share.start, share.total)
        latents = latents.to(loop.accelerator.device, dtype)
        noised = loop.objective.noised(latents, torch.Generator().manual_seed(step_seed), share)
        with loop.accelerator.autocast():
            encoding = loop.conditioning.encode(batch.captions, grad=self.trainable.trains_text_encoder)
            conditioning = parts.family.conditioning(encoding, batch)
            prediction = parts.unet(noised.noisy, noised.timesteps, **conditioning.unet_kwargs(dtype)).sample
        weight = batch.loss_weight
        if loop.masks is not None and (mask := loop.masks.weights(batch)) is not None:
            weight = mask if weight is None else weight * mask
        return loop.objective.loss(prediction, latents, noised, batch, weight, share)

    def _optimizer_step(self, loop: LoopParts) -> dict[str, float]:
        """Step (unless the fused backward pass already did), then what follows each step: the trainable's own
        update (max-norm regularisation; its numbers are returned for the logs) and the EMA. Data-parallel: the
        gradients are summed over the processes first."""
        if loop.fused is None:
            params = [p for g in loop.optimizer.param_groups for p in g["params"]]  # not re-collected from the model
            self.processes.sum_gradients(params)
            if self.config.optimizer.max_grad_norm:
                loop.accelerator.clip_grad_norm_(params, self.config.optimizer.max_grad_norm)
            loop.optimizer.step()
        if loop.fused is not None or not loop.optimizer.step_was_skipped:  # fp16 overflow skips; the schedule waits
            loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        after = getattr(self.trainable, "after_optimizer_step", None)  # optional in the Trainable protocol
        scalars = after() if after is not None else {}
        if loop.ema is not None:
            loop.ema.update(self.progress.global_step + 1)
        return scalars

    # ---------------------------------------------------------------- saving
    def _write_files(self, loop: LoopParts, artifact: Path, with_state: bool) -> None:
        """The artifact, then its state (a kill between leaves a usable artifact, never a state without one)."""
        save_artifact(self.trainable, loop.ema, self.config.ema.save_as, artifact, self.progress)
        if with_state:
            extra = {**self.run.run_shape(), "nan_skipped": self.nan_guard.skipped, "processes": self.processes.count,
                     **({"tensorboard_dir": str(self.log.dir)} if self.log else {})}
            save_state(state_dir_for(artifact), self.progress, self.trainable.state_dict(), loop.optimizer,
                       loop.scheduler, loop.accelerator.scaler, extra, loop.ema.state_dict() if loop.ema else None)
        self.hooks.after_save(self, loop, artifact)

    def _say(self, message: str) -> None:
        (self.log.write if self.log else print)(message)

    def _stopped(self, log: RunLog) -> NoReturn:
        """Ctrl-C or SIGTERM: save the result and a state, print the command that continues, exit. With several
        processes the main one saves and the others wait for it."""
        step = self.progress.global_step
        saved = self.processes.main_only(lambda: self.saver.interrupted(step))
        if saved is not None:
            artifact, state = saved
            command = self.saver.resume_command(state)
            self._summary("interrupted", log, output=str(artifact), resume_state=str(state), resume_command=command)
            log.write(f"\nstopped at step {step} of {self.plan.total_steps}: saved {artifact} and its state.\n"
                      f"continue with:\n  {command}")
        log.close()
        raise SystemExit(self.stops.exit_code())

    def _summary(self, status: str, log: RunLog, **fields) -> None:
        """<output_dir>/<name>.run.json, for scripts and the run queue (library/training/run_summary.py)."""
        if not self.processes.is_main:
            return
        average = log.average.value if log.average.values else None
        try:
            write_run_summary(summary_path(self.output_dir, self.config.save.name), status,
                              step=self.progress.global_step, total_steps=self.plan.total_steps,
                              final_loss=average, last_loss=log.last_loss, tensorboard=str(log.dir),
                              processes=self.processes.count if self.processes.count > 1 else None, **fields)
        except OSError as err:  # the summary is for scripts; a full disk must not hide what happened to the run
            self._say(f"could not write the run summary {err.filename}: {err.strerror or err}")

    # ---------------------------------------------------------------- the loop
    def train(self) -> Path:
        check_clip_skip(self.config.model.clip_skip, self.parts)
        loop = self._setup()
        self.saver = RunSaver(self.config.save, self.trainable.artifact_suffix, self.stops,
                              partial(self._write_files, loop), self._say, self.run.command, self.processes.is_main)
        self.saver.clean_leftovers()
        if self.config.save.resume:
            self._resume(loop)
        if self.progress.global_step >= self.plan.total_steps:
            print(f"the state is already at step {self.progress.global_step} of {self.plan.total_steps}: "
                  "nothing to train; raise train.max_steps / train.epochs to continue")
        try:
            fill_latents(loop.latents, self.processes)
            if loop.masks is not None:
                loop.masks.fill()
        except KeyboardInterrupt:
            print("\ninterrupted while caching latents, before any training step: nothing to save")
            raise SystemExit(130) from None
        release_vae(self.run, self.parts, self.trainable, keep=self.hooks.needs_vae)
        self.trainable.set_train(True)
        self.processes.broadcast([p for g in loop.optimizer.param_groups for p in g["params"]])
        log = self.log = self._open_log()
        self._summary("running", log)
        with self.stops:
            self._train_loop(loop, log)
            if self.progress.global_step < self.plan.total_steps and self._stop_requested():
                self._stopped(log)
            log.close()
            try:
                final = self.processes.main_only(self.saver.final) or self.saver.final_path()
            except SaveFailed as err:  # the result is in a rescue folder, or nowhere: the summary says which
                self._summary("failed", log, error=str(err))
                raise
            self.hooks.after_train(self, loop, final)
        self._summary("finished", log, output=str(final))
        print(f"saved {final}\nTensorBoard logs: {log.dir}")
        return final

    def _train_loop(self, loop: LoopParts, log: RunLog) -> None:
        """before_train and the epochs; a failure is recorded in the run summary before it propagates."""
        try:
            self.hooks.before_train(self, loop)
            self._epochs(loop, log)
        except KeyboardInterrupt:  # a signal the handler did not catch (not the main thread): stop the same way
            self.stops.requested = True
        except Exception as err:
            self._summary("failed", log, error=str(err).splitlines()[0] if str(err) else type(err).__name__)
            log.close()
            raise

    def _open_log(self) -> RunLog:
        """The progress bar and TensorBoard writer; a resumed run writes on in its earlier TensorBoard folder."""
        from library.config.loading import config_to_toml

        folder = run_folder(self.config.logging.log_dir, self.config.save.name, self.resumed_log_dir,
                            continuing=self.start is not None)
        print(tensorboard_command(folder))
        return RunLog(folder, self.plan.total_steps, self.progress.global_step, config_to_toml(self.config),
                      quiet=not self.processes.is_main)

    def _epochs(self, loop: LoopParts, log: RunLog) -> None:
        for epoch in range(self.progress.epoch, self.plan.epochs):
            if self.progress.global_step >= self.plan.total_steps or self._stop_requested():
                return
            batches = self.data.epoch_batches(epoch)
            epoch_losses = self._epoch(loop, log, epoch, batches)
            if epoch_losses:
                log.epoch_end(epoch, sum(epoch_losses) / len(epoch_losses))
            if self.progress.epoch == epoch and self.progress.next_batch == len(batches):
                self.hooks.after_epoch(self, loop, epoch + 1)
                # a finished epoch counts as done even when it is the last (the final file's ss_epoch)
                self.progress = Progress(self.progress.global_step, epoch + 1, 0)
                self.saver.due(self.progress, self.plan.total_steps, epoch_done=True)

    def _epoch(self, loop: LoopParts, log: RunLog, epoch: int, batches: list[list[int]]) -> list[float]:
        """The optimizer steps of one epoch from progress.next_batch on; returns their losses. Stops after the
        step in which Ctrl-C or SIGTERM arrived."""
        accumulation, seed = self.config.train.gradient_accumulation_steps, self.config.train.seed
        epoch_losses: list[float] = []
        group_loss, group_skipped = 0.0, 0
        for index in range(self.progress.next_batch, len(batches)):
            group_start = (index // accumulation) * accumulation
            group_size = min(accumulation, len(batches) - group_start)
            step_seed = hash_ints(seed, epoch, index)
            torch.manual_seed(self.processes.seed(step_seed))  # dropout inside the network draws from the global RNG
            share = self.processes.share(len(batches[index]))  # the rows of this batch this process trains on
            # the whole batch's samples (random crops come from the step seed), then this process's rows of them
            batch = self.data.batch(epoch, batches[index], step_seed).rows(share.rows)
            loss = self._loss(loop, batch, epoch, step_seed, share) if share.size else self._no_rows(loop)
            if fault_point("loss") == "nan":  # the reliability tests' NaN (library/faults.py)
                loss = loss * float("nan")
            value = self.processes.loss_value(loss)  # the whole batch's, summed over the processes
            if math.isfinite(value):
                if share.size:
                    loop.accelerator.backward(loss / group_size)
                    self.trainable.after_backward()
                group_loss += value / group_size
            else:  # stops the run (TrainingDiverged), or skips the batch under train.nan_policy = "skip"
                log.write(self.nan_guard.on_bad_loss(self.progress.global_step + 1, epoch, self.saver.last_good))
                group_skipped += 1
            if index + 1 - group_start < group_size:
                continue
            lrs = current_lrs(loop.scheduler, loop.optimizer)  # the rates this step uses, not the next
            scalars = {}
            if group_skipped < group_size:
                scalars = self._optimizer_step(loop)
            else:  # every batch of the group was skipped: no update, the schedule waits (as for an fp16 overflow)
                loop.optimizer.zero_grad(set_to_none=True)
            self.progress = Progress(self.progress.global_step + 1, epoch, index + 1)
            if group_skipped < group_size:
                log.step(self.progress.global_step, group_loss, lrs, epoch, scalars)
                epoch_losses.append(group_loss)
            self.hooks.after_step(self, loop, group_loss, lrs, batch)
            group_loss, group_skipped = 0.0, 0
            self.saver.due(self.progress, self.plan.total_steps, epoch_done=False)
            fault_point("step")
            if self.progress.global_step >= self.plan.total_steps or self._stop_requested():
                break
        return epoch_losses

    def _stop_requested(self) -> bool:
        """Ctrl-C or SIGTERM reached this process or (data-parallel) any other: all stop after the same step."""
        return self.processes.any(self.stops.requested)

    @staticmethod
    def _no_rows(loop: LoopParts) -> torch.Tensor:
        """The loss of a process without rows in a batch smaller than the number of processes."""
        return torch.zeros((), device=loop.accelerator.device)
