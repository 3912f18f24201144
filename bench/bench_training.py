#!/usr/bin/env python
"""Training benchmark: seconds per LoRA step, peak memory and where the step time goes (CPU).

    .venv/bin/python bench/bench_training.py [--models tiny,sd15] [--steps 3] [--resolution 256]
                                             [--threads N] [--mixed-precision no|bf16] [--batch-size 1]
                                             [--gradient-checkpointing]

Each model runs in its own subprocess (so one model's peak RSS and thread setting cannot leak into the
next) through the code train_lora.py runs: prepare_run → LoraTrainable → Trainer.train(), on
examples/sample_dataset/train. The timings come from hooks on the UNet, the VAE encoder, the LoRA
parameters and the optimizer; the training loop itself is not re-implemented. bench/README.md explains
the columns and how the UNet share is measured.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLES = REPO / "examples" / "sample_dataset" / "train"
MODELS = {
    "tiny": "built-in tiny-sd15 (builtin:tiny-sd15)",
    "tiny-sdxl": "built-in tiny-sdxl (builtin:tiny-sdxl)",
    "sd15": "full-size SD1.5 architecture (library/models/model_configs/sd1), seeded random weights",
    "sdxl": "full-size SDXL architecture (library/models/model_configs/sdxl: 2.6 B UNet, two text encoders), "
            "seeded random weights",
}
FULL_SIZE = {"sd15": "sd1", "sdxl": "sdxl"}  # config folder of each full-size architecture
RANDOM_SEED = 1234


# ----------------------------------------------------------------------------------------- measurement


@dataclass
class StepTiming:
    """One optimizer step: when it ended and how long the UNet's forward and backward took inside it."""

    end: float
    unet_forward_s: float
    unet_backward_s: float


@dataclass
class _Pending:
    forward_s: float = 0.0
    forward_start: float | None = None
    # [start, latest UNet parameter gradient] per backward through the UNet in this step
    backwards: list[list[float]] = field(default_factory=list)


class StepProbe:
    """Times a training run from the outside with hooks; install it with ``with StepProbe(...):``.

    UNet forward: forward pre-hook → forward hook on the UNet module. UNet backward: from the moment the
    gradient of the UNet's output is computed (a tensor hook on ``.sample``) to the moment the last
    trainable UNet parameter has its gradient accumulated (post-accumulate-grad hooks). The text encoder's
    backward cannot start before that: its input gradient needs every cross-attention layer's
    contribution, so it is not counted as UNet time. Step ends: a global optimizer step post-hook.
    """

    def __init__(self, unet, unet_params: list, vae_encoder):
        self.unet = unet
        self.unet_params = unet_params
        self.vae_encoder = vae_encoder
        self.steps: list[StepTiming] = []
        self.encode_s = 0.0
        self.encoded_images = 0
        self._pending = _Pending()
        self._encode_start = 0.0
        self._handles: list = []

    def __enter__(self) -> Self:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handles = [
            self.unet.register_forward_pre_hook(self._unet_forward_start),
            self.unet.register_forward_hook(self._unet_forward_end),
            self.vae_encoder.register_forward_pre_hook(self._encode_start_hook),
            self.vae_encoder.register_forward_hook(self._encode_end_hook),
            register_optimizer_step_post_hook(self._step_end),
        ]
        self._handles += [p.register_post_accumulate_grad_hook(self._unet_grad) for p in self.unet_params]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _unet_forward_start(self, module, args) -> None:
        self._pending.forward_start = time.perf_counter()

    def _unet_forward_end(self, module, args, output) -> None:
        now = time.perf_counter()
        self._pending.forward_s += now - (self._pending.forward_start or now)
        sample = getattr(output, "sample", output)
        if getattr(sample, "requires_grad", False):
            sample.register_hook(self._unet_backward_start)

    def _unet_backward_start(self, grad) -> None:
        now = time.perf_counter()
        self._pending.backwards.append([now, now])

    def _unet_grad(self, param) -> None:
        if self._pending.backwards:
            self._pending.backwards[-1][1] = time.perf_counter()

    def _encode_start_hook(self, module, args) -> None:
        self._encode_start = time.perf_counter()

    def _encode_end_hook(self, module, args, output) -> None:
        self.encode_s += time.perf_counter() - self._encode_start
        self.encoded_images += int(args[0].shape[0])

    def _step_end(self, optimizer, args, kwargs) -> None:
        pending = self._pending
        backward_s = sum(end - start for start, end in pending.backwards)
        self.steps.append(StepTiming(time.perf_counter(), pending.forward_s, backward_s))
        self._pending = _Pending()


@dataclass
class ModelResult:
    """What one model's run measured; the parent process prints these as the table."""

    model: str
    resolution: int
    batch_size: int
    threads: int
    mixed_precision: str
    gradient_checkpointing: bool
    measured_steps: int
    s_per_step: float  # median over measured steps
    step_s: list[float]  # every measured step, in order
    unet_share: float  # sum of UNet forward+backward time / sum of step time, measured steps
    unet_forward_s: float  # median per step
    unet_backward_s: float  # median per step
    cache_s_per_image: float  # VAE encoder forward per cached image
    cached_images: int
    build_s: float
    peak_rss_gib: float
    torch_version: str


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if platform.system() == "Darwin" else peak / 2**20


def summarize(model: str, args: argparse.Namespace, probe: StepProbe, threads: int, build_s: float,
              torch_version: str) -> ModelResult:
    """Drop the warm-up step and reduce the probe's raw timings to one table row."""
    steps = probe.steps
    if len(steps) < 2:
        raise RuntimeError(f"the probe saw {len(steps)} optimizer step(s); a benchmark needs a warm-up step and more")
    durations = [b.end - a.end for a, b in itertools.pairwise(steps)]
    measured = steps[1:]
    unet_total = sum(s.unet_forward_s + s.unet_backward_s for s in measured)
    return ModelResult(
        model=model,
        resolution=args.resolution,
        batch_size=args.batch_size,
        threads=threads,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        measured_steps=len(measured),
        s_per_step=statistics.median(durations),
        step_s=durations,
        unet_share=unet_total / sum(durations),
        unet_forward_s=statistics.median(s.unet_forward_s for s in measured),
        unet_backward_s=statistics.median(s.unet_backward_s for s in measured),
        cache_s_per_image=probe.encode_s / max(probe.encoded_images, 1),
        cached_images=probe.encoded_images,
        build_s=build_s,
        peak_rss_gib=peak_rss_gib(),
        torch_version=torch_version,
    )


# ----------------------------------------------------------------------------------------- one model (child)


def write_config(folder: Path, args: argparse.Namespace, model: str) -> Path:
    """A LoRA run config with the library defaults for [network] and [optimizer], outputs inside ``folder``."""
    builtin = "builtin:tiny-sdxl" if "sdxl" in model else "builtin:tiny-sd15"
    text = f"""
[model]
path = "{builtin}"  # full-size models swap in their own ModelParts; the path only has to validate
[dataset]
train_dir = "{SAMPLES.as_posix()}"
resolution = {args.resolution}
cache_latents = "memory"
[train]
max_steps = {args.steps + 1}  # one warm-up step that is not measured
batch_size = {args.batch_size}
mixed_precision = "{args.mixed_precision}"
gradient_checkpointing = {str(args.gradient_checkpointing).lower()}
num_threads = {args.threads or 0}
device = "cpu"
seed = 42
[save]
output_dir = "{(folder / 'out').as_posix()}"
name = "bench"
overwrite = true
[logging]
log_dir = "{(folder / 'logs').as_posix()}"
"""
    path = folder / "bench.toml"
    path.write_text(text, encoding="utf-8")
    return path


def build_full_size_random(model: str, mixed_precision: str):
    """ModelParts with a full-size architecture from library/models/model_configs/ and seeded random weights,
    built as the tiny built-ins are; nothing is downloaded. With bf16 each component is cast as soon as it is
    built (the trainer holds the frozen weights in bf16 anyway), so the build never holds the whole fp32 model."""
    import torch

    from library.models.builtin import build_random
    from library.models.paths import CONFIG_ROOT

    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    folder = FULL_SIZE[model]
    return build_random(CONFIG_ROOT / folder, RANDOM_SEED, f"random:{folder}", dtype=dtype)


def run_model(model: str, args: argparse.Namespace) -> ModelResult:
    """Train ``args.steps + 1`` LoRA steps on ``model`` through the library and measure them."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # before the build, so model init uses the same threads
    from library.quiet import quiet_libraries

    quiet_libraries()
    from library.models.loading import load_model
    from library.recipes.lora import RECIPE
    from library.recipes.run import parse_args as parse_run_args
    from library.recipes.run import prepare
    from library.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        prepared = prepare(RECIPE, parse_run_args([str(write_config(Path(tmp), args, model))], "training benchmark"))
        assert prepared is not None  # no --check / --print-config was passed
        run = prepared[0]
        start = time.perf_counter()
        print(f"building {MODELS[model]} ...", flush=True)
        if model in FULL_SIZE:
            parts = build_full_size_random(model, args.mixed_precision)
        else:
            parts = load_model("builtin:tiny-sd15" if model == "tiny" else f"builtin:{model}")
        build_s = time.perf_counter() - start
        built = RECIPE.build(parts, run)
        print("\n".join(built.lines))
        unet_params = [p for p in parts.unet.parameters() if p.requires_grad]
        with StepProbe(parts.unet, unet_params, parts.vae.encoder) as probe:
            Trainer(run, parts, built.trainable).train()
        return summarize(model, args, probe, torch.get_num_threads(), build_s, torch.__version__)


# ----------------------------------------------------------------------------------------- parent


def run_child(model: str, args: argparse.Namespace, folder: Path) -> ModelResult | None:
    """Run one model in a fresh interpreter; None (after its output) when it failed."""
    result_file = folder / f"{model}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", model, "--result-file", str(result_file),
               "--steps", str(args.steps), "--resolution", str(args.resolution),
               "--mixed-precision", args.mixed_precision, "--batch-size", str(args.batch_size)]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    if args.threads:
        command += ["--threads", str(args.threads)]
    print(f"\n=== {model}: {MODELS[model]} ===", flush=True)
    code = subprocess.call(command, cwd=REPO)
    if code != 0 or not result_file.is_file():
        print(f"error: the {model} benchmark failed (exit code {code}); its output is above", file=sys.stderr)
        return None
    return ModelResult(**json.loads(result_file.read_text(encoding="utf-8")))


def format_table(results: list[ModelResult]) -> str:
    header = ("model", "res", "batch", "threads", "precision", "grad ckpt", "s/step", "UNet fwd+bwd", "other",
              "cache s/img", "peak RSS GiB")
    rows = [header] + [
        (r.model, f"{r.resolution}", f"{r.batch_size}", f"{r.threads}", r.mixed_precision,
         "on" if r.gradient_checkpointing else "off", f"{r.s_per_step:.3f}",
         f"{r.unet_share:.0%}", f"{1 - r.unet_share:.0%}", f"{r.cache_s_per_image:.3f}", f"{r.peak_rss_gib:.2f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_details(results: list[ModelResult]) -> str:
    return "\n".join(
        f"{r.model}: steps {', '.join(f'{s:.3f}' for s in r.step_s)} s; median UNet forward {r.unet_forward_s:.3f} s"
        f" + backward {r.unet_backward_s:.3f} s per step; {r.cached_images} latents cached; "
        f"model build {r.build_s:.1f} s"
        for r in results
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,sd15", help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (one more warm-up step runs first)")
    parser.add_argument("--resolution", type=int, default=256, help="training resolution in pixels")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="train.gradient_checkpointing = true (recompute activations in the backward pass)")
    parser.add_argument("--child", choices=tuple(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    if args.steps < 1 or args.batch_size < 1 or args.threads < 0:
        parser.error("--steps and --batch-size must be at least 1, --threads at least 0")
    args.model_list = models
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_model(args.child, args)
        target = Path(args.result_file)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(asdict(result)), encoding="utf-8")
        os.replace(temporary, target)
        return 0
    with tempfile.TemporaryDirectory(prefix="kiln-bench-results-") as folder:
        results = [r for m in args.model_list if (r := run_child(m, args, Path(folder))) is not None]
    if not results:
        return 1
    print(f"\nLoRA training on {SAMPLES.relative_to(REPO)}: {args.steps} measured step(s) after 1 warm-up step; "
          f"torch {results[0].torch_version}, {results[0].threads} torch thread(s), {os.cpu_count()} CPU core(s)\n")
    print(format_table(results))
    print()
    print(format_details(results))
    return 0 if len(results) == len(args.model_list) else 1


if __name__ == "__main__":
    sys.exit(main())
