"""bench_scripts.py's child process: run one training script as a user would (its ``main([config])``) and
measure it from the outside, then time the bare model cost in the same process.

What is measured, and how (bench/README.md has the same in prose):
- step ends: a global optimizer step post-hook (PyTorch public API); step k lasts from the end of step k-1's
  optimizer step to the end of its own, so it covers everything the loop does per step.
- setup: from this process's start (the OS's process creation time) to the first text-encoder or UNet forward
  of the training loop (latent caching runs only the VAE), i.e. the moment step 1 starts computing.
- memory: RSS sampled every 50 ms by a thread (and at every step end); ru_maxrss; on CUDA the allocator peaks.
- bare: after ``main`` returned, with the run's own modules, trainable parameters and optimizer: UNet
  forward (+ the text encoder's when the run trains through it) on random latents of the run's shape,
  MSE loss, backward, optimizer step, zero_grad, under the run's autocast setting.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

GIB = 2**30


class ProcessClock:
    """Seconds since this process was created (time.perf_counter based, anchored once to the creation time)."""

    def __init__(self):
        created = psutil.Process().create_time()
        self._zero = time.perf_counter() - (time.time() - created)

    def now(self) -> float:
        return time.perf_counter() - self._zero


class RssSampler(threading.Thread):
    """Resident set size of this process every 50 ms, as (seconds since process start, bytes)."""

    def __init__(self, clock: ProcessClock, interval: float = 0.05):
        super().__init__(daemon=True, name="rss-sampler")
        self.clock, self.interval = clock, interval
        self.samples: list[tuple[float, int]] = []
        self._process = psutil.Process()
        self._stop_event = threading.Event()

    def sample(self) -> None:
        self.samples.append((self.clock.now(), self._process.memory_info().rss))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


@dataclass
class Capture:
    """What the run showed while it trained: the trainer, its optimizer, the last UNet call's inputs, the last
    batch's conditioning arguments and the time of the loop's first model forward."""

    clock: ProcessClock
    trainer: object = None
    optimizer: object = None
    first_forward: float | None = None
    unet_args: tuple = ()
    unet_kwargs: dict = field(default_factory=dict)
    batch: object = None
    step_ends: list[float] = field(default_factory=list)
    step_rss: list[int] = field(default_factory=list)
    cuda_peaks: dict = field(default_factory=dict)
    on_step: list = field(default_factory=list)  # callables(step_number) run at each step end (the profiler)
    handles: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------- Trainer coupling


@dataclass
class RunView:
    """The parts of a trainer the bare measurement needs."""

    parts: object  # ModelParts
    unet: object
    params: list
    trains_text_encoder: bool
    weight_dtype: object
    device: object
    mixed_precision: str
    clip_skip: int
    max_token_length: int
    total_steps: int


def run_view(trainer) -> RunView:
    """THE ONE PLACE that reads library.training.trainer.Trainer internals (its attributes may be renamed by
    branches changing the loop; fix them here). Everything else goes through ModelParts, the Trainable
    protocol (param_groups, trains_text_encoder) and public PyTorch hooks."""
    config, run, parts, trainable = trainer.config, trainer.run, trainer.parts, trainer.trainable
    params = [p for group in trainable.param_groups() for p in group["params"]]
    return RunView(parts=parts, unet=parts.unet, params=params, trains_text_encoder=trainable.trains_text_encoder,
                   weight_dtype=run.weight_dtype, device=run.device, mixed_precision=config.train.mixed_precision,
                   clip_skip=config.model.clip_skip, max_token_length=config.train.max_token_length,
                   total_steps=trainer.plan.total_steps)


def install_capture(capture: Capture) -> None:
    """Wrap Trainer.train (capture only: the original runs unchanged on the same object) and hook the step
    ends. Called before the script's main, so the trainer the script builds is the one captured."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from library.training.trainer import Trainer

    original = Trainer.train

    def train(self):
        capture.trainer = self
        _hook_models(capture, run_view(self))
        return original(self)

    Trainer.train = train
    capture.handles.append(register_optimizer_step_post_hook(lambda opt, args, kwargs: _step_end(capture, opt)))


def _hook_models(capture: Capture, view: RunView) -> None:
    """Forward pre-hooks on the UNet and text encoders (the first marks the loop's start; the UNet's keeps its
    last inputs), and a recording wrapper on the family's conditioning (the last batch, whose captions the
    bare measurement encodes again when the text encoder trains)."""
    def first(module, args):
        if capture.first_forward is None:
            capture.first_forward = capture.clock.now()

    def unet_inputs(module, args, kwargs):
        first(module, args)
        capture.unet_args = tuple(a.detach() if hasattr(a, "detach") else a for a in args)
        capture.unet_kwargs = _detached(kwargs)

    family = view.parts.family
    conditioning = family.conditioning

    def recording_conditioning(encoding, batch=None):
        capture.batch = batch
        return conditioning(encoding, batch)

    family.conditioning = recording_conditioning
    capture.handles.append(view.unet.register_forward_pre_hook(unet_inputs, with_kwargs=True))
    capture.handles += [encoder.register_forward_pre_hook(first) for encoder in view.parts.text_encoders]


def _detached(value):
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value.detach() if hasattr(value, "detach") else value


def _step_end(capture: Capture, optimizer) -> None:
    import torch

    capture.optimizer = optimizer
    capture.step_ends.append(capture.clock.now())
    capture.step_rss.append(psutil.Process().memory_info().rss)
    step = len(capture.step_ends)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if step == 1:  # the steps' own peak starts here; keep the peak before
            capture.cuda_peaks["setup_allocated"] = torch.cuda.max_memory_allocated()
            capture.cuda_peaks["setup_reserved"] = torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        else:
            capture.cuda_peaks["steps_allocated"] = torch.cuda.max_memory_allocated()
            capture.cuda_peaks["steps_reserved"] = torch.cuda.max_memory_reserved()
    for callback in capture.on_step:
        callback(step)


# ----------------------------------------------------------------------------------------- the bare cost


def _autocast(view: RunView):
    import torch

    if view.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if view.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=view.device.type, dtype=dtype)  # what accelerate's autocast() enters


def _bare_unet_kwargs(view: RunView, capture: Capture) -> dict:
    """The UNet's conditioning: from a text-encoder forward (with gradients) when the run trains through the
    text encoder, else random states of the captured shape (plus the captured extras, SDXL's size ids)."""
    import torch

    if view.trains_text_encoder:
        family = view.parts.family
        encoding = family.encode_text(view.parts, list(capture.batch.captions), view.clip_skip,
                                      view.max_token_length)
        return family.conditioning(encoding, capture.batch).unet_kwargs(view.weight_dtype)
    kwargs = dict(capture.unet_kwargs)
    kwargs["encoder_hidden_states"] = torch.randn_like(kwargs["encoder_hidden_states"])
    return kwargs


def measure_bare(view: RunView, capture: Capture, iterations: int) -> list[float]:
    """Seconds of `iterations` bare steps after one warm-up step (see the module docstring)."""
    import torch

    sample, timesteps = capture.unet_args[0], capture.unet_args[1]
    optimizer, cuda = capture.optimizer, view.device.type == "cuda"
    num_timesteps = int(view.parts.noise_scheduler.config.num_train_timesteps)
    optimizer.zero_grad(set_to_none=True)
    times = []
    for _ in range(iterations + 1):
        latents = torch.randn_like(sample)
        t = torch.randint(0, num_timesteps, timesteps.shape, device=timesteps.device)
        target = torch.randn_like(sample)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with _autocast(view):
            kwargs = _bare_unet_kwargs(view, capture)
            prediction = view.unet(latents, t, **kwargs).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


# ----------------------------------------------------------------------------------------- the child's run


def _ru_maxrss() -> int:
    """The kernel's peak RSS of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


@dataclass
class ChildResult:
    script: str
    config: str
    threads: int
    torch_version: str
    device: str
    step_s: list[float]  # steps 2..N: end of step k-1's optimizer step to the end of step k's
    timed_steps: list[int]  # their step numbers (the profiled step is left out)
    step1_s: float  # first model forward of the loop to the end of step 1
    setup_s: float  # process start to the first model forward of the loop
    bare_s: list[float]  # bare iterations after one warm-up
    peak_rss_steps: int  # bytes, sampled from the end of step 1 to the end of the last step
    peak_rss: int  # bytes, sampled from process start until main returned
    ru_maxrss: int  # bytes, the kernel's peak RSS of this process (includes the bare measurement)
    cuda: dict  # max_memory_allocated / reserved before step 1 ended ("setup_*") and during steps ("steps_*")
    device_name: str  # the GPU's name on CUDA, else "cpu"
    cpu_bf16_kernels: bool  # oneDNN has bf16 kernels for this CPU (without them bf16 convolutions fall back to slow ones)
    main_s: float  # process start to main's return (includes the final save)
    profile: dict | None = None


def run_child(script: str, label: str, config: Path, result_file: Path, bare_iterations: int,
              profile: bool, overrides: list[str] = ()) -> int:
    """Run `script`'s main on `config` (and the command line's KEY=VALUE `overrides`) in this process, then
    measure the bare cost; write the result JSON."""
    from library.host_memory import request_huge_pages

    request_huge_pages()  # what the script's main does first; the hooks below import torch before it runs
    clock = ProcessClock()
    sampler = RssSampler(clock)
    sampler.start()
    capture = Capture(clock)
    install_capture(capture)
    profiler = None
    if profile:
        from bench_scripts_profile import StepProfiler

        profiler = StepProfiler(capture)
    module = importlib.import_module(script)
    code = module.main([str(config), *overrides])
    main_s = clock.now()
    sampler.stop()
    for handle in capture.handles:
        handle.remove()
    if code != 0:
        return code
    if capture.trainer is None or len(capture.step_ends) < 2:
        print(f"error: the run made {len(capture.step_ends)} optimizer step(s); the benchmark needs 2 or more",
              file=sys.stderr)
        return 1
    import torch

    view = run_view(capture.trainer)
    ends = capture.step_ends
    from library.training.device import cpu_has_bf16

    bare = measure_bare(view, capture, bare_iterations)
    peak_steps = max(sampler.peak(ends[0], ends[-1]), *capture.step_rss[1:])
    durations = {step: b - a for step, (a, b) in enumerate(zip(ends, ends[1:]), start=2)}
    if profiler:  # the profiled step runs slower: it is reported by the profile, not timed
        durations.pop(profiler.step, None)
    result = ChildResult(
        script=script, config=label, threads=torch.get_num_threads(), torch_version=torch.__version__,
        device=str(view.device), step_s=list(durations.values()), timed_steps=list(durations),
        step1_s=ends[0] - capture.first_forward, setup_s=capture.first_forward, bare_s=bare,
        peak_rss_steps=peak_steps, peak_rss=max(sampler.peak(), *capture.step_rss),
        ru_maxrss=_ru_maxrss(), cuda=capture.cuda_peaks, main_s=main_s,
        device_name=torch.cuda.get_device_name(view.device) if view.device.type == "cuda" else "cpu",
        cpu_bf16_kernels=cpu_has_bf16(),
        profile=profiler.summary() if profiler else None)
    temporary = result_file.with_name(f".{result_file.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(asdict(result)), encoding="utf-8")
    os.replace(temporary, result_file)
    print(f"bench: steps {', '.join(f'{s:.3f}' for s in result.step_s)} s; bare "
          f"{', '.join(f'{s:.3f}' for s in bare)} s (median {statistics.median(bare):.3f})", flush=True)
    return 0
