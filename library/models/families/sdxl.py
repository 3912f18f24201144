"""Stable Diffusion XL: two text encoders, a UNet also conditioned on a pooled text embedding and size ids.

- Text: OpenAI CLIP ViT-L (768 wide, pads with the end token) and OpenCLIP ViT-bigG as
  `CLIPTextModelWithProjection` (1280 wide, pads with "!"). The UNet attends to both encoders' penultimate
  hidden states, without the final layer norm, concatenated (2048 wide); the second encoder's final state at
  the end token, projected, is the pooled embedding. Computed here, not by transformers, whose legacy configs
  (eos_token_id 2) pool at the largest token id: a textual-inversion token in the prompt (ids ≥ 49408)
  would win over the end token (sd-scripts pools at the end token for the same reason).
- `clip_skip` counts as for SD1 (1 = the model's own layer, 2 = one further back): SDXL's own layer is the
  penultimate, so clip_skip = 2 takes the third-from-last (diffusers' `clip_skip=1`).
- Size conditioning ("time ids"): [original height, original width, crop top, crop left, target height,
  target width] per sample, from the batch's geometry (library/data/batches.py SampleGeometry).
- Files: LoRA UNet keys on the original (SGM) block names (`lora_unet_input_blocks_4_1_…`), text encoders
  `lora_te1_` / `lora_te2_`; single files keep TE1 in HF names under `conditioner.embedders.0.transformer.`
  and TE2 in OpenCLIP names under `conditioner.embedders.1.model.`; embeddings `{"clip_l", "clip_g"}`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from library.models import ldm_layout as layout
from library.models.clip_tokenizer import EOS_TOKEN, build_clip_tokenizer
from library.models.conditioning import CHUNK, Conditioning, TextEncoding, stitch_chunks, tokenize_chunks
from library.models.families.base import ModelFamily, TextEncoderSlot

_TEXT_ENCODERS = (
    TextEncoderSlot("text_encoder", "tokenizer", "lora_te1_text_model_", "text_encoder", "clip_l"),
    TextEncoderSlot("text_encoder_2", "tokenizer_2", "lora_te2_text_model_", "text_encoder_2", "clip_g"),
)
_CONTEXT_DIM = 2048  # 768 + 1280: the released base model's cross-attention width


def pooled_at_end_token(encoder, output, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The projected final state at each caption's first end token (sd-scripts' `pool_workaround`)."""
    positions = (input_ids == eos_token_id).int().argmax(dim=-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return encoder.text_projection(output.last_hidden_state[rows, positions])


def time_ids(batch: Any, device: torch.device) -> torch.Tensor:
    """[B, 6] size ids (original h, w, crop top, left, target h, w) as SDXL was trained, in fp32."""
    geometry = getattr(batch, "geometry", None)
    if not geometry:
        raise ValueError("SDXL conditioning needs each sample's size and crop (a batch of TrainingData)")
    rows = [(g.original_size[1], g.original_size[0], g.crop_top, g.crop_left, g.target_size[1], g.target_size[0])
            for g in geometry]
    return torch.tensor(rows, dtype=torch.float32, device=device)


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    text_encoders = _TEXT_ENCODERS
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"

    def claims_configs(self, unet_config: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    def claims_ldm_keys(self, keys: Sequence[str]) -> bool:
        # both embedders: a file with only the OpenCLIP one (conditioner.embedders.0.model.) is the refiner
        return (any(k.startswith(layout.SDXL_CLIP_PREFIX) for k in keys)
                and any(k.startswith(layout.SDXL_OPENCLIP_PREFIX) for k in keys))

    def config_folder(self, context_dim: int | None) -> str | None:
        return self.name if context_dim == _CONTEXT_DIM else None

    def build_tokenizers(self) -> list:
        return [build_clip_tokenizer(pad_token=EOS_TOKEN), build_clip_tokenizer(pad_token="!")]

    def text_encoder_classes(self) -> list[type]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return [CLIPTextModel, CLIPTextModelWithProjection]

    def native_resolution(self, v_prediction: bool) -> int:
        return 1024

    def encode_text(self, parts, captions: list[str], clip_skip: int, max_token_length: int = CHUNK) -> TextEncoding:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders):
            windows = tokenize_chunks(tokenizer, captions, max_token_length).to(encoder.device)
            count, ids = windows.shape[1], windows.flatten(0, 1)
            output = encoder(ids, output_hidden_states=True)
            # no final layer norm, as SDXL was trained
            hidden.append(stitch_chunks(output.hidden_states[-(clip_skip + 1)], count))
            if hasattr(encoder, "text_projection"):  # long captions: the first window's pooled output (sd-scripts)
                pooled = pooled_at_end_token(encoder, output, ids, tokenizer.eos_token_id)[::count]
        return TextEncoding(torch.cat(hidden, dim=-1), pooled)

    def conditioning(self, encoding: TextEncoding, batch: Any = None) -> Conditioning:
        ids = time_ids(batch, encoding.hidden_states.device)
        return Conditioning(encoding.hidden_states, {"text_embeds": encoding.pooled, "time_ids": ids})

    def prompt_embeds(self, positive: TextEncoding, negative: TextEncoding) -> dict:
        # the pipeline adds the size ids itself (original = target = the image size, crop 0, 0)
        return {"prompt_embeds": positive.hidden_states, "negative_prompt_embeds": negative.hidden_states,
                "pooled_prompt_embeds": positive.pooled, "negative_pooled_prompt_embeds": negative.pooled}

    def pipeline(self, parts, scheduler: Any):
        from diffusers import StableDiffusionXLPipeline

        first, second = parts.text_encoders
        return StableDiffusionXLPipeline(vae=parts.vae, text_encoder=first, text_encoder_2=second,
                                         tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1],
                                         unet=parts.unet, scheduler=scheduler, add_watermarker=False)

    def unet_kohya_namer(self, unet_config: Mapping[str, Any]) -> Callable[[str], str]:
        original = layout.unet_module_namer(unet_config)  # sd-scripts' SDXL UNet uses the original block names
        return lambda module_path: self.unet_kohya_prefix + original(module_path).replace(".", "_")

    def ldm_text_state_dict(self, text_state_dicts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        first, second = text_state_dicts
        return {**layout.clip_text_to_ldm(first, layout.SDXL_CLIP_PREFIX),
                **layout.openclip_text_to_ldm(second, layout.SDXL_OPENCLIP_PREFIX)}

    def base_model_version(self, v_prediction: bool) -> tuple[str, str]:
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"


SDXL = StableDiffusionXL()
