"""The model-family interface: everything that differs between SD1, SD2 and SDXL, so that no other module
compares family names. The trainers, caches, sampling, file writers and LoRA tools ask the family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from library.models.conditioning import Conditioning, TextEncoding

if TYPE_CHECKING:
    from library.models.parts import ModelParts


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: its diffusers name (subfolder and pipeline argument) and its tokenizer's,
    the kohya LoRA key prefix of its modules, the name of its learning-rate group and log tag, and the key of
    its textual-inversion vectors in safetensors embeddings."""

    attribute: str
    tokenizer: str
    kohya_prefix: str
    group: str
    embedding_key: str = "emb_params"


class ModelFamily:
    """Base class; one stateless instance per family is registered in library/models/families/__init__.py."""

    name: str = ""  # "sd1", "sd2", "sdxl": what files and logs record
    label: str = ""  # "SD 1.x" for messages
    text_encoders: tuple[TextEncoderSlot, ...] = ()
    unet_kohya_prefix = "lora_unet_"
    is_v2 = False  # sd-scripts' ss_v2 flag
    modelspec_implementation = "diffusers"  # modelspec.implementation of its LoRA files, as sd-scripts writes it
    # sd-scripts' block-wise LoRA settings (down_lr_weight, block_dims, ...): the UNet's blocks as
    # (before, down, mid, up, after) counts, the down/mid/up ones being what down_/mid_/up_lr_weight list;
    # None: the family has no block-wise settings
    unet_block_layout: tuple[int, int, int, int, int] | None = None

    # ---------------------------------------------------------------- recognising a model
    def claims_configs(self, unet_config: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        """True when diffusers configs (UNet, first text encoder) describe a model of this family."""
        raise NotImplementedError

    def claims_ldm_keys(self, keys: Sequence[str]) -> bool:
        """True when an original-layout single file's keys are this family's."""
        raise NotImplementedError

    def config_folder(self, context_dim: int | None) -> str | None:
        """The shipped full-size config folder (library/models/model_configs/<name>) that describes a single
        file whose UNet attends to `context_dim`-wide states, or None when this family has none that wide."""
        raise NotImplementedError

    # ---------------------------------------------------------------- building a model
    def build_tokenizers(self) -> list:
        """The family's tokenizers, built offline, one per text encoder."""
        raise NotImplementedError

    def text_encoder_classes(self) -> list[type]:
        """transformers classes of the text encoders, in slot order."""
        raise NotImplementedError

    def native_resolution(self, v_prediction: bool) -> int:
        """The square size the family's base models were trained at."""
        raise NotImplementedError

    # ---------------------------------------------------------------- conditioning
    def encode_text(self, parts: "ModelParts", captions: list[str], clip_skip: int,
                    max_token_length: int = 75) -> TextEncoding:
        """Run the text encoders on captions of up to `max_token_length` tokens (75, 150 or 225: longer
        captions are encoded in windows of 75, see library/models/conditioning.py); gradients flow if the
        caller enables them."""
        raise NotImplementedError

    def conditioning(self, encoding: TextEncoding, batch: Any = None) -> Conditioning:
        """The UNet inputs for a batch's text encoding; `batch` supplies per-image extras (SDXL size ids)."""
        return Conditioning(encoding.hidden_states)

    def prompt_embeds(self, positive: TextEncoding, negative: TextEncoding) -> dict:
        """Keyword arguments that hand precomputed embeddings to the family's diffusers pipeline."""
        return {"prompt_embeds": positive.hidden_states, "negative_prompt_embeds": negative.hidden_states}

    def pipeline(self, parts: "ModelParts", scheduler: Any) -> Any:
        """A diffusers sampling pipeline sharing the parts' modules (no safety checker)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- files other tools read
    def unet_kohya_namer(self, unet_config: Mapping[str, Any]) -> Callable[[str], str]:
        """A function giving the kohya LoRA name of a UNet module path (SD1/2: its diffusers path; SDXL: the
        original block names, which depend on the UNet's block layout)."""
        return lambda module_path: self.unet_kohya_prefix + module_path.replace(".", "_")

    def unet_block_names(self) -> list[str]:
        """The names of the UNet's blocks in sd-scripts' order (block_dims lists one value per name)."""
        raise NotImplementedError

    def unet_block_index(self, module_path: str) -> int | None:
        """The sd-scripts block (an index into unet_block_names) a UNet module belongs to, or None."""
        raise NotImplementedError

    def text_encoder_kohya_name(self, slot: TextEncoderSlot, module_path: str) -> str:
        # built explicitly: transformers 5 dropped the `text_model.` level every kohya key still carries
        return slot.kohya_prefix + module_path.removeprefix("text_model.").replace(".", "_")

    def ldm_text_state_dict(self, text_state_dicts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The text encoders' tensors under their original single-file names."""
        raise NotImplementedError

    def base_model_version(self, v_prediction: bool) -> tuple[str, str]:
        """(ss_base_model_version, modelspec.architecture) as sd-scripts writes them."""
        raise NotImplementedError

    def claims_base_model_version(self, version: str) -> bool:
        """True when a file's `ss_base_model_version` says it was made for this family."""
        return version in {self.base_model_version(v)[0] for v in (False, True)}

    def metadata(self, v_prediction: bool) -> dict[str, str]:
        """Family-dependent `ss_*` strings LoRA tools show."""
        version, _ = self.base_model_version(v_prediction)
        return {"ss_base_model_version": version, "ss_v2": str(self.is_v2)}
