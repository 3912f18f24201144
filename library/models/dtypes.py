"""The dtype each part of a base model is loaded and kept in, decided before any weight is read: frozen weights
in the run's compute dtype (train.mixed_precision), the weights a run trains in fp32. The loaders cast each
tensor as they read it, so a bf16 run never holds an fp32 copy of its frozen weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection

import torch

# What a run can keep in fp32 (recipes/resolve.py part_dtypes): the UNet, every text encoder of the family,
# only the text encoders' token-embedding matrices (textual inversion reads its starting vectors from them), the
# VAE (DreamBooth saves it with the model).
PART_NAMES = ("unet", "text_encoders", "token_embeddings", "vae")


@dataclass(frozen=True)
class PartDtypes:
    """Per part of a base model, the dtype its floating-point weights load in. `text_encoders` applies to every
    text-encoder slot of the family; `token_embeddings`, when set, overrides it for their input-embedding
    matrices. The VAE's dtype is resolved against its config (`vae_for`)."""

    unet: torch.dtype = torch.float32
    text_encoders: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32
    token_embeddings: torch.dtype | None = None

    @classmethod
    def uniform(cls, dtype: torch.dtype) -> "PartDtypes":
        """Every part in `dtype` (tools that load a model to convert or compare it)."""
        return cls(dtype, dtype, dtype)

    @classmethod
    def for_run(cls, weight_dtype: torch.dtype, full_precision: Collection[str] = ()) -> "PartDtypes":
        """Frozen parts in `weight_dtype`; the parts named in `full_precision` (see PART_NAMES) in fp32."""
        unknown = sorted(set(full_precision) - set(PART_NAMES))
        if unknown:
            raise ValueError(f"unknown model parts {unknown}; expected some of {PART_NAMES}")

        def dtype_of(part: str) -> torch.dtype:
            return torch.float32 if part in full_precision else weight_dtype

        embeddings = dtype_of("token_embeddings") if "token_embeddings" in full_precision else None
        return cls(dtype_of("unet"), dtype_of("text_encoders"), dtype_of("vae"), embeddings)

    def vae_for(self, vae_config: Any) -> torch.dtype:
        """The VAE's dtype given its config. bf16 has fp32's range and is safe; fp16 overflows in the SD1/SD2
        VAEs (NaN latents, black images), so fp16 only for a VAE whose config says it does not
        (force_upcast = false, e.g. the fp16-fix VAEs), fp32 otherwise."""
        force_upcast = vae_config.get("force_upcast", True) if isinstance(vae_config, dict) else getattr(
            vae_config, "force_upcast", True)
        if self.vae == torch.float16 and force_upcast:
            return torch.float32
        return self.vae

    def text_read_dtype(self) -> torch.dtype:
        """The dtype the text encoders are read in: fp32 when the token embeddings must stay fp32."""
        if self.token_embeddings is not None and self.token_embeddings != self.text_encoders:
            return torch.float32
        return self.text_encoders

    def line(self, vae_config: Any = None) -> str:
        """'UNet bf16, text encoder bf16, VAE bf16' for the run's start."""
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        vae = self.vae_for(vae_config) if vae_config is not None else self.vae
        text = names[self.text_encoders] + (f" (token embeddings {names[self.token_embeddings]})"
                                            if self.token_embeddings not in (None, self.text_encoders) else "")
        return f"UNet {names[self.unet]}, text encoder {text}, VAE {names[vae]}"


FULL_PRECISION = PartDtypes()


def cast_module(module: torch.nn.Module, dtype: torch.dtype, keep: torch.nn.Parameter | None = None) -> None:
    """Cast a module's floating-point parameters and buffers to `dtype` in place, one tensor at a time (so at most
    one tensor exists twice); `keep` is left as it is. A no-op for tensors already in `dtype`."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor is not keep and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def cast_parts(parts, dtypes: PartDtypes) -> None:
    """Cast every part of a loaded model (ModelParts) to its dtype, in place and tensor by tensor."""
    cast_module(parts.unet, dtypes.unet)
    cast_module(parts.vae, dtypes.vae_for(parts.vae.config))
    for encoder in parts.text_encoders:
        embedding = encoder.get_input_embeddings().weight if dtypes.token_embeddings is not None else None
        cast_module(encoder, dtypes.text_encoders, keep=embedding)
        if embedding is not None:
            cast_module(encoder.get_input_embeddings(), dtypes.token_embeddings)
