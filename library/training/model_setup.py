"""Getting the loaded model ready for the loop, and the lines that say how: each part on the device in its
dtype, attention backend and gradient checkpointing, the VAE released once latents are cached, the optimizer
line printed at start. Kept out of trainer.py so the loop reads on its own."""
from __future__ import annotations

import os

import torch

from library.errors import UserError
from library.models.attention import select_attention
from library.models.parts import ModelParts
from library.registry import canonical_optimizer_name
from library.training.device import cpu_has_bf16
from library.training.optimizers import step_implementation, uses_relative_step
from library.training.resolved import ResolvedRun
from library.training.trainable import Trainable


class TrainingSetupError(UserError):
    """The loaded model or the state to resume from does not fit the run."""


def place_models(run: ResolvedRun, parts: ModelParts, trainable: Trainable, device: torch.device) -> None:
    """Frozen weights in the compute dtype; trainable ones stay fp32 so small updates are not lost (unless
    train.full_bf16 / full_fp16 keep them in half precision). Trainable weights are never cast down first: a
    full fine-tune (DreamBooth) trains the models' own weights."""
    train = run.config.train
    trained = [param for group in trainable.param_groups() for param in group["params"]]
    keep = {id(param) for param in trained}
    for module in (parts.unet, *parts.text_encoders):
        torch.nn.Module.to(module, device)
        for param in module.parameters():
            if id(param) not in keep:
                param.data = param.data.to(run.weight_dtype)
    # the VAE encodes in the run's precision where that is safe (bf16; fp16 only for a VAE made for it)
    torch.nn.Module.to(parts.vae, device, run.part_dtypes.vae_for(parts.vae.config))
    for param in trained:  # tensors outside the models too
        param.data = param.data.to(device=device, dtype=run.trained_dtype)
    print(select_attention([parts.unet], train.attention, device))
    if device.type == "cpu" and torch.bfloat16 in (run.weight_dtype, run.trained_dtype) and not cpu_has_bf16():
        print("note: this CPU has no native bf16 kernels (no AVX-512 BF16/AMX): bf16 convolutions take a slow path "
              "and can be many times slower than fp32 here (the VAE encodes in fp32 for that reason); "
              "train.mixed_precision = \"no\" is faster on it")
    if train.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if trainable.trains_text_encoder:
            for encoder in parts.text_encoders:  # transformers 5 renamed the method; 4.x keeps the old one
                getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
    parts.vae.requires_grad_(False)
    _speed_options(train, parts.unet, device)


def _speed_options(train, unet: torch.nn.Module, device: torch.device) -> None:
    """train.channels_last and train.torch_compile, applied in place so module names (and so saved keys) stay."""
    if train.channels_last:
        torch.nn.Module.to(unet, memory_format=torch.channels_last)
        print("UNet: channels-last memory layout (train.channels_last)")
    if train.torch_compile:
        unet.compile(backend=train.dynamo_backend)
        print(f"UNet: torch.compile with the {train.dynamo_backend} backend (train.torch_compile); the first step "
              "compiles it and takes minutes, each new bucket size compiles again")
        if (train.dynamo_backend == "inductor" and device.type == "cpu"
                and "TORCHINDUCTOR_LAYOUT_OPTIMIZATION" not in os.environ):  # the user's own choice stands
            # Measured on SD1.5 LoRA (docs/PERFORMANCE.md): inductor's channels-last layout optimization made CPU
            # steps about 2x slower (9.9 against 4.9 s) and held 1.7 GiB more; without it they ran as fast as eager.
            # (PyTorch already defaults it off on ROCm.)
            import torch._inductor.config as inductor_config

            inductor_config.layout_optimization = False
            print("UNet: inductor's layout optimization off on the CPU (about 2x slower steps with it on SD1.5); "
                  "TORCHINDUCTOR_LAYOUT_OPTIMIZATION=1 turns it back on")


def release_vae(run: ResolvedRun, parts: ModelParts, trainable: Trainable, keep: bool) -> None:
    """Once latents are cached, the VAE's memory goes back unless previews decode with it (`keep`): freed (the
    disk cache keeps the encoder, to rebuild an entry damaged during the run), or moved to the CPU when the
    artifact is the whole model."""
    if run.latent_mode == "off" or keep:
        return
    if trainable.saves_base_model:
        torch.nn.Module.to(parts.vae, "cpu")
    else:
        parts.release_vae(keep_encoder=run.latent_mode == "disk")


def optimizer_line(run: ResolvedRun, trainable: Trainable, optimizer: torch.optim.Optimizer) -> str:
    """What the run optimizes with, as it starts: optimizer, its args and step implementation, schedule, rate
    per group."""
    opt = run.config.optimizer
    args = ", ".join(f"{key}={value}" for key, value in opt.args.items())
    name = f"{canonical_optimizer_name(opt.name)}({args})" if args else canonical_optimizer_name(opt.name)
    if implementation := step_implementation(optimizer):
        name += f" ({implementation} step)"
    if run.lr_schedule is not None:
        schedule = f"A1111 schedule {run.lr_schedule!r}"
    elif uses_relative_step(opt.name, opt.args):
        schedule = "Adafactor's own (relative_step: it computes each step's rate)"
    else:
        warmup = f" with {run.warmup_steps} warmup steps" if run.warmup_steps else ""
        schedule = f"{opt.scheduler}{warmup} over {run.plan.total_steps} steps"
    rates = ", ".join(f"{group['name']} {group['lr']:g}" for group in trainable.param_groups())
    if uses_relative_step(opt.name, opt.args):
        rates = "computed by Adafactor (logged as lr/<group>)"
    elif canonical_optimizer_name(opt.name) in ("DAdaptAdam", "Prodigy"):
        rates += " (multipliers of the step size the optimizer finds)"
    return f"optimizer: {name}; lr schedule: {schedule}; learning rates: {rates}"


def check_clip_skip(clip_skip: int, parts: ModelParts) -> None:
    """model.clip_skip must leave at least one layer of every text encoder."""
    for encoder in parts.text_encoders:
        layers = getattr(encoder.config, "num_hidden_layers", None)
        if layers is not None and clip_skip > layers:
            raise TrainingSetupError(f"model.clip_skip = {clip_skip} but the text encoder has {layers} layers")
