"""A full fine-tune as a `Trainable` (DreamBooth): the UNet's own weights, and optionally the text encoders'
until a given step. The resumable state is the trained weights themselves; the artifact is a whole model."""
from __future__ import annotations

from pathlib import Path

import torch

from library.models.parts import ModelParts
from library.models.saving import save_model
from library.training.checkpoints import Progress
from library.training.hooks import TrainerHooks

UNET_KEY = "unet."


class FullModelTrainable:
    """Every UNet weight at `unet_lr`, plus every text encoder's at `text_encoder_lr` (None: frozen) until step
    `stop_text_encoder_at` (0: never stops). Saved with `save_model`: `artifact_suffix` ".safetensors" writes a
    single file, "" a diffusers folder."""

    saves_base_model = True

    def __init__(self, parts: ModelParts, unet_lr: float, text_encoder_lr: float | None, stop_text_encoder_at: int,
                 artifact_suffix: str, save_dtype: torch.dtype):
        self.parts = parts
        self.artifact_suffix = artifact_suffix
        self.save_dtype = save_dtype
        self.trains_text_encoder = self.text_encoders_train = text_encoder_lr is not None
        self.stop_step = stop_text_encoder_at if self.trains_text_encoder else 0
        parts.vae.requires_grad_(False)
        parts.unet.requires_grad_(True)
        for encoder in parts.text_encoders:
            encoder.requires_grad_(self.trains_text_encoder)
        self.groups = [{"params": list(parts.unet.parameters()), "lr": unet_lr, "name": "unet"}]
        if self.trains_text_encoder:
            # the groups stay after the text encoders stop (their weights then get no gradient, so no update):
            # the optimizer's groups must match a resumed state's
            self.groups += [{"params": list(encoder.parameters()), "lr": text_encoder_lr, "name": slot.group}
                            for slot, encoder in zip(parts.family.text_encoders, parts.text_encoders)]

    def _trained_modules(self) -> list[tuple[str, torch.nn.Module]]:
        modules = [(UNET_KEY, self.parts.unet)]
        if self.text_encoders_train:
            modules += [(f"{slot.attribute}.", encoder)
                        for slot, encoder in zip(self.parts.family.text_encoders, self.parts.text_encoders)]
        return modules

    def describe(self, what: str) -> str:
        counts = [f"UNet {sum(p.numel() for p in self.parts.unet.parameters()):,} parameters"]
        if self.trains_text_encoder:
            until = f" until step {self.stop_step}" if self.stop_step else ""
            size = sum(p.numel() for e in self.parts.text_encoders for p in e.parameters())
            counts.append(f"text encoder {size:,} parameters{until}")
        kind = "single .safetensors file" if self.artifact_suffix else "diffusers folder"
        return f"{what}: full fine-tune of the {' and '.join(counts)}; saves a {kind}"

    def param_groups(self) -> list[dict]:
        return self.groups

    def set_train(self, training: bool) -> None:
        self.parts.unet.train(training)
        for encoder in self.parts.text_encoders:
            encoder.train(training and self.trains_text_encoder)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {prefix + k: v for prefix, module in self._trained_modules() for k, v in module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, module in self._trained_modules():
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
        """Freeze the text encoders once `step` reaches the stop step."""
        if not (self.trains_text_encoder and self.stop_step and step >= self.stop_step):
            return
        for encoder in self.parts.text_encoders:
            encoder.requires_grad_(False)
            for param in encoder.parameters():
                param.grad = None
            encoder.eval()
        self.trains_text_encoder = False  # the loop then runs the text encoders without gradients
        print(f"text encoder: training stopped at step {step} (dreambooth.stop_text_encoder_training)")

    def save(self, path: Path, progress: Progress) -> None:
        save_model(self.parts, path, self.save_dtype)


class StopTextEncoderHooks(TrainerHooks):
    """Tells the trainable each step the loop reaches, also when a run resumes past the text-encoder stop."""

    def __init__(self, trainable: FullModelTrainable):
        self.trainable = trainable

    def after_step(self, trainer, loop, loss, lrs, batch) -> None:
        self.trainable.reached_step(trainer.progress.global_step)

    def after_resume(self, trainer, loop) -> None:
        self.trainable.reached_step(trainer.progress.global_step)
