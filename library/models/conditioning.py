"""Text conditioning: captions → token ids → what the UNet attends to.

`TextEncoding` is what the text encoders give for a batch of captions (what the text-encoder cache keeps);
`Conditioning` is everything the UNet call takes besides the noisy latents and timesteps. A model family
(library/models/families/) turns one into the other, adding what its UNet needs beyond the hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's 77-token window."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states for the UNet's cross-attention. clip_skip=2 takes the penultimate layer and applies the
    final layer norm, as A1111 and sd-scripts do."""
    output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=clip_skip > 1)
    if clip_skip == 1:
        return output.last_hidden_state
    return text_encoder.final_layer_norm(output.hidden_states[-clip_skip])


@dataclass
class TextEncoding:
    """The text encoders' output for a batch: hidden states [B, tokens, width] and, for families whose UNet
    takes one, a pooled embedding [B, width] (None otherwise)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self) -> list["TextEncoding"]:
        """One encoding per caption (what a per-caption cache stores), on the CPU."""
        pooled = [None] * len(self.hidden_states) if self.pooled is None else self.pooled.detach().cpu()
        return [TextEncoding(h, p) for h, p in zip(self.hidden_states.detach().cpu(), pooled)]

    @staticmethod
    def stack(rows: list["TextEncoding"], device: torch.device | str) -> "TextEncoding":
        hidden = torch.stack([row.hidden_states for row in rows]).to(device)
        pooled = None if rows[0].pooled is None else torch.stack([row.pooled for row in rows]).to(device)
        return TextEncoding(hidden, pooled)


_EXACT = ("time_ids",)  # added conditioning passed as given


@dataclass
class Conditioning:
    """The UNet's conditioning inputs: cross-attention states plus any extra inputs (SDXL: pooled text
    embedding and size ids), passed as diffusers' `added_cond_kwargs`."""

    hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword arguments for `unet(noisy, timesteps, **kwargs)`, in the compute dtype; SDXL's size ids stay
        fp32 (the UNet embeds them in fp32 itself; bf16 would round a size of 1500 to 1504)."""
        kwargs: dict = {"encoder_hidden_states": self.hidden_states.to(dtype)}
        if self.added:
            kwargs["added_cond_kwargs"] = {k: v if k in _EXACT else v.to(dtype) for k, v in self.added.items()}
        return kwargs
