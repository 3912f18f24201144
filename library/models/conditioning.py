"""Text conditioning: captions → token ids → the text encoder's hidden states the UNet attends to."""
from __future__ import annotations

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
