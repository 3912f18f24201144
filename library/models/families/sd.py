"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, UNet conditioned on its hidden states only.

SD1 uses OpenAI's CLIP ViT-L (768 wide, pads with the end token); SD2 OpenCLIP ViT-H (1024 wide, pads with
"!", written to single files in OpenCLIP's names). Everything else is shared.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from library.models import ldm_layout as layout
from library.models.clip_tokenizer import EOS_TOKEN, build_clip_tokenizer
from library.models.conditioning import CHUNK, TextEncoding, encode_text, stitch_chunks, tokenize_chunks
from library.models.families.base import ModelFamily, TextEncoderSlot

_TEXT_ENCODER = TextEncoderSlot("text_encoder", "tokenizer", "lora_te_text_model_", "text_encoder")
# Cross-attention widths of the released models; smaller (built-in, test) models are told apart by SD2's
# linear transformer projections and GELU text encoder.
_RELEASED_WIDTHS = (768, 1024)
# sd-scripts' 25 blocks of the SD1/2 UNet (networks/lora.py get_block_index): IN00 (conv_in, never adapted) to
# IN11, MID, OUT00 to OUT11; each down/up block i holds layers j at 3i + j and its down/upsampler at 3i + 2
_BLOCKS_PER_SIDE = 12
_LAYER = re.compile(r"^(up|down)_blocks\.(\d+)\.(resnets|attentions|upsamplers|downsamplers)\.(\d+)\.")


class StableDiffusion(ModelFamily):
    text_encoders = (_TEXT_ENCODER,)
    unet_block_layout = (0, _BLOCKS_PER_SIDE, 1, _BLOCKS_PER_SIDE, 0)

    def __init__(self, name: str, label: str, context_dim: int, pad_token: str, ldm_text_prefix: str,
                 openclip_layout: bool, versions: tuple[tuple[str, str], tuple[str, str]], is_v2: bool):
        self.name = name
        self.label = label
        self.context_dim = context_dim
        self.pad_token = pad_token
        self.ldm_text_prefix = ldm_text_prefix
        self.openclip_layout = openclip_layout  # SD2's text encoder uses linear projections and GELU too
        self.versions = versions  # (epsilon, v-prediction) → (ss_base_model_version, modelspec.architecture)
        self.is_v2 = is_v2

    def claims_configs(self, unet_config: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        if unet_config.get("addition_embed_type") is not None:
            return False  # an extra-conditioned UNet (SDXL) is another family
        width = int(unet_config.get("cross_attention_dim", 0))
        if width in _RELEASED_WIDTHS:
            return width == self.context_dim
        linear = bool(unet_config.get("use_linear_projection")) or text_config.get("hidden_act") == "gelu"
        return linear == self.openclip_layout

    def claims_ldm_keys(self, keys: Sequence[str]) -> bool:
        return any(key.startswith(self.ldm_text_prefix) for key in keys)

    def config_folder(self, context_dim: int | None) -> str | None:
        return self.name if context_dim == self.context_dim else None

    def build_tokenizers(self) -> list:
        return [build_clip_tokenizer(pad_token=self.pad_token)]

    def text_encoder_classes(self) -> list[type]:
        from transformers import CLIPTextModel

        return [CLIPTextModel]

    def native_resolution(self, v_prediction: bool) -> int:
        return 768 if self.is_v2 and v_prediction else 512

    def encode_text(self, parts, captions: list[str], clip_skip: int, max_token_length: int = CHUNK) -> TextEncoding:
        ids = tokenize_chunks(parts.tokenizers[0], captions, max_token_length)
        hidden = encode_text(parts.text_encoders[0], ids.flatten(0, 1), clip_skip)
        return TextEncoding(stitch_chunks(hidden, ids.shape[1]))

    def pipeline(self, parts, scheduler: Any):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoders[0],
                                       tokenizer=parts.tokenizers[0], unet=parts.unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def ldm_text_state_dict(self, text_state_dicts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.openclip_layout:
            return layout.openclip_text_to_ldm(text_state_dicts[0])
        return layout.clip_text_to_ldm(text_state_dicts[0])

    def base_model_version(self, v_prediction: bool) -> tuple[str, str]:
        return self.versions[1 if v_prediction else 0]

    def unet_block_names(self) -> list[str]:
        side = range(_BLOCKS_PER_SIDE)
        return [f"IN{i:02d}" for i in side] + ["MID"] + [f"OUT{i:02d}" for i in side]

    def unet_block_index(self, module_path: str) -> int | None:
        if module_path.startswith("mid_block."):
            return _BLOCKS_PER_SIDE
        match = _LAYER.match(module_path)
        if match is None:
            return None
        side, block, kind, layer = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        index = 3 * block + (2 if kind in ("upsamplers", "downsamplers") else layer)
        return 1 + index if side == "down" else _BLOCKS_PER_SIDE + 1 + index


SD1 = StableDiffusion("sd1", "SD 1.x", 768, EOS_TOKEN, "cond_stage_model.transformer.", False,
                      (("sd_v1", "stable-diffusion-v1"), ("sd_v1", "stable-diffusion-v1")), is_v2=False)
SD2 = StableDiffusion("sd2", "SD 2.x", 1024, "!", layout.OPENCLIP_PREFIX, True,
                      (("sd_v2", "stable-diffusion-v2-512"), ("sd_v2_v", "stable-diffusion-v2-768-v")), is_v2=True)
