"""DreamBooth as a `Trainable` for the shared loop: the UNet's own weights (and optionally the text encoder's,
until a given step) are trained, and whole models are written in the formats other tools load."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from library.training.checkpoints import Progress
from library.recipes.dreambooth_config import DreamBoothRunConfig
from library.models.loading import ModelParts, save_diffusers, save_single_file
from library.training.trainer import TrainerHooks

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET_KEY, TEXT_ENCODER_KEY = "unet.", "text_encoder."


def model_format(path: Path) -> str:
    """"single_file" for a .safetensors path, else "diffusers" (a folder)."""
    return "single_file" if Path(path).suffix.lower() == ".safetensors" else "diffusers"


def _cpu_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The module rebuilt on the CPU in `dtype`, without first copying it where it lives (a GPU may have no
    room for a second UNet). Buffers are built normally; weights are assigned from the original."""
    with init_empty_weights():
        if hasattr(module, "from_config"):  # diffusers models
            clone = type(module).from_config(module.config)
        else:  # transformers models
            clone = type(module)(module.config)
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
             for k, v in module.state_dict().items()}
    clone.load_state_dict(state, assign=True)
    return clone.eval()


def save_model(parts: ModelParts, path: Path, dtype: torch.dtype) -> None:
    """Write the whole model atomically: `path` ending in .safetensors → an original-layout single file
    (A1111, ComfyUI, diffusers' from_single_file); anything else → a diffusers folder. Floats cast to dtype;
    the modules in `parts` are left as they are (training goes on)."""
    path = Path(path)
    if model_format(path) == "single_file":
        save_single_file(parts, path, dtype)  # casts tensor by tensor on the CPU and writes via temp + rename
        return
    copy = ModelParts(parts.tokenizer, _cpu_copy(parts.text_encoder, dtype), _cpu_copy(parts.vae, dtype),
                      _cpu_copy(parts.unet, dtype), parts.noise_scheduler, parts.family, parts.v_prediction,
                      parts.source)
    save_diffusers(copy, path)  # written to a temporary folder, then moved into place


class DreamBoothTrainable:
    """Full fine-tune: every UNet weight, plus the text encoder's when configured (frozen after
    dreambooth.stop_text_encoder_training steps). The resumable state is the trained weights themselves."""

    def __init__(self, parts: ModelParts, config: DreamBoothRunConfig):
        db = config.dreambooth
        self.parts = parts
        self.config = config
        self.artifact_suffix = ".safetensors" if db.save_format == "single_file" else ""
        self.trains_text_encoder = db.train_text_encoder
        self.stop_step = db.stop_text_encoder_training if db.train_text_encoder else 0
        parts.vae.requires_grad_(False)
        parts.unet.requires_grad_(True)
        parts.text_encoder.requires_grad_(db.train_text_encoder)
        self.groups = [{"params": list(parts.unet.parameters()), "lr": db.unet_lr or config.optimizer.lr,
                        "name": "unet"}]
        if db.train_text_encoder:
            # the group stays after the text encoder stops (its weights then get no gradient, so no update):
            # the optimizer's groups must match a resumed state's
            self.groups.append({"params": list(parts.text_encoder.parameters()),
                                "lr": db.text_encoder_lr or config.optimizer.lr, "name": "text_encoder"})

    def describe(self) -> str:
        db = self.config.dreambooth
        counts = [f"UNet {sum(p.numel() for p in self.parts.unet.parameters()):,} parameters"]
        if db.train_text_encoder:
            until = f" until step {self.stop_step}" if self.stop_step else ""
            counts.append(f"text encoder {sum(p.numel() for p in self.parts.text_encoder.parameters()):,} "
                          f"parameters{until}")
        kind = "single .safetensors file" if db.save_format == "single_file" else "diffusers folder"
        return (f"DreamBooth: full fine-tune of the {' and '.join(counts)}; saves a {kind} "
                f"({self.config.save.precision})")

    def param_groups(self) -> list[dict]:
        return self.groups

    def set_train(self, training: bool) -> None:
        self.parts.unet.train(training)
        self.parts.text_encoder.train(training and self.trains_text_encoder)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {UNET_KEY + k: v for k, v in self.parts.unet.state_dict().items()}
        if self.config.dreambooth.train_text_encoder:
            state.update({TEXT_ENCODER_KEY + k: v for k, v in self.parts.text_encoder.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        targets = [(UNET_KEY, self.parts.unet)]
        if self.config.dreambooth.train_text_encoder:
            targets.append((TEXT_ENCODER_KEY, self.parts.text_encoder))
        for prefix, module in targets:
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                raise ValueError(f"the training state has no {prefix.rstrip('.')} weights: it was saved by "
                                 "another kind of run (LoRA, textual inversion, or DreamBooth without "
                                 "text-encoder training); resume it with the same settings")
            with torch.no_grad():
                module.load_state_dict(part)  # copies into the existing (fp32, on-device) parameters

    def after_backward(self) -> None:
        pass

    def reached_step(self, step: int) -> None:
        """Freeze the text encoder once `step` reaches dreambooth.stop_text_encoder_training."""
        if not (self.trains_text_encoder and self.stop_step and step >= self.stop_step):
            return
        encoder = self.parts.text_encoder
        encoder.requires_grad_(False)
        for param in encoder.parameters():
            param.grad = None
        encoder.eval()
        self.trains_text_encoder = False  # the loop then runs the text encoder without gradients
        print(f"text encoder: training stopped at step {step} (dreambooth.stop_text_encoder_training)")

    def save(self, path: Path, progress: Progress) -> None:
        save_model(self.parts, path, SAVE_DTYPES[self.config.save.precision])


class DreamBoothHooks(TrainerHooks):
    """Tells the trainable each step the loop reaches, also when a run resumes past the text-encoder stop."""

    def __init__(self, trainable: DreamBoothTrainable):
        self.trainable = trainable

    def after_step(self, trainer, loop, loss, lrs, batch) -> None:
        self.trainable.reached_step(trainer.progress.global_step)

    def after_resume(self, trainer, loop) -> None:
        self.trainable.reached_step(trainer.progress.global_step)
