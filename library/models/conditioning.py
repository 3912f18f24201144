"""Text conditioning: captions → token ids → what the UNet attends to.

`TextEncoding` is what the text encoders give for a batch of captions (what the text-encoder cache keeps);
`Conditioning` is everything the UNet call takes besides the noisy latents and timesteps. A model family
(library/models/families/) turns one into the other, adding what its UNet needs beyond the hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


CHUNK = 75  # caption tokens per text-encoder pass (77 with the start and end tokens)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's 77-token window."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def tokenize_chunks(tokenizer, captions: list[str], max_token_length: int = CHUNK) -> torch.Tensor:
    """[B, n, 77] token ids for captions of up to `max_token_length` (75, 150 or 225) tokens, as sd-scripts
    splits them: the ids padded to max_token_length + 2, cut into n = max_token_length / 75 windows of the start
    token, 75 tokens and the sequence's last token. With a pad token other than the end token (SD2, SDXL's second
    encoder) a window whose text ends inside it gets an end token, and an empty window starts with one."""
    ids = tokenizer(captions, padding="max_length", max_length=max_token_length + 2, truncation=True,
                    return_tensors="pt").input_ids
    count = max_token_length // CHUNK
    if count == 1:
        return ids.unsqueeze(1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for i in range(count):
        window = torch.cat([ids[:, :1], ids[:, 1 + CHUNK * i:1 + CHUNK * (i + 1)], ids[:, -1:]], dim=1)
        if pad != eos:
            ends_inside = (window[:, -2] != eos) & (window[:, -2] != pad)
            window[ends_inside, -1] = eos
            window[window[:, 1] == pad, 1] = eos
        windows.append(window)
    return torch.stack(windows, dim=1)


def stitch_chunks(hidden: torch.Tensor, count: int) -> torch.Tensor:
    """[B·n, 77, D] states of n windows per caption → [B, 1 + 75·n + 1, D]: the first window's start token,
    the 75 caption tokens of every window, the last window's final token (sd-scripts' long-caption layout)."""
    if count == 1:
        return hidden
    per_caption = hidden.reshape(-1, count, *hidden.shape[1:])
    middle = per_caption[:, :, 1:-1].reshape(per_caption.shape[0], -1, hidden.shape[-1])
    return torch.cat([per_caption[:, 0, :1], middle, per_caption[:, -1, -1:]], dim=1)


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
