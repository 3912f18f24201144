"""What a model is, read without loading its weights: the family, the UNet's cross-attention width and the text
encoders' widths, from a single file's header (safetensors) or tensor index (a weights-only, memory-mapped
.ckpt), a diffusers folder's configs, or a built-in model's configs. `--check` uses it to refuse an unsupported
checkpoint, or add-on files made for another model, before anything loads."""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from library.models import ldm_layout as layout
from library.models.families import ModelFamily, family_for_configs, family_for_ldm_keys, supported_labels
from library.models.paths import (BUILTIN_PREFIX, CONFIG_ROOT, SINGLE_FILE_SUFFIXES, ModelLoadError,
                                  cached_hub_folder)
from library.models.sizes import SIZES_FILE, ModelSizes, folder_sizes, ldm_part, read_sizes_file, sizes_from_shapes
from library.safe_load import UnreadableTensorFile, load_weights_only


@dataclass(frozen=True)
class ModelHeader:
    family: ModelFamily
    context_dim: int | None  # the UNet's cross-attention width
    text_widths: tuple[int, ...]  # hidden width of each text encoder, in slot order
    found: str  # how it was told, for the summary line
    sizes: ModelSizes | None = None  # parameter counts per part, when the shapes can be read without loading
    attention_widths: tuple[int, ...] = ()  # widths the UNet's self-attention layers work at (320/640/1280 on SD1)

    def line(self) -> str:
        widths = " + ".join(str(w) for w in self.text_widths) or "?"
        return f"model: {self.family.label} (text width {widths}, cross-attention {self.context_dim}; {self.found})"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read model config {path}: {exc}") from None


def _from_configs(folder: Path, found: str) -> ModelHeader:
    unet, text = _json(folder / "unet" / "config.json"), _json(folder / "text_encoder" / "config.json")
    family = family_for_configs(unet, text)
    if family is None:
        raise ModelLoadError(f"{folder}: a model of an unsupported family (cross-attention width "
                             f"{unet.get('cross_attention_dim')}); Kiln trains {supported_labels()}")
    widths = tuple(int(_json(folder / slot.attribute / "config.json").get("hidden_size", 0))
                   for slot in family.text_encoders if (folder / slot.attribute / "config.json").is_file())
    return ModelHeader(family, unet.get("cross_attention_dim"), widths, found, attention_widths=attention_widths(unet))


def attention_widths(unet_config) -> tuple[int, ...]:
    """The widths of the UNet's attention blocks, from its diffusers config: each cross-attention down/up block's
    channels and the middle block's (diffusers' default middle block has attention)."""
    channels = list(unet_config.get("block_out_channels", ()))
    down = unet_config.get("down_block_types", ())
    up = unet_config.get("up_block_types", ())
    widths = {c for c, kind in zip(channels, down) if kind.startswith("CrossAttn")}
    widths |= {c for c, kind in zip(reversed(channels), up) if kind.startswith("CrossAttn")}
    middle = unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if channels and "CrossAttn" in middle:
        widths.add(channels[-1])
    return tuple(sorted(int(w) for w in widths))


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a .safetensors or .ckpt file, reading no tensor data."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise ModelLoadError(f"cannot read {path} as safetensors ({exc}); the file may be incomplete") from None
    import torch

    try:  # memory-mapped: the tensors' data stay on disk
        data = load_weights_only(path, mmap=zipfile.is_zipfile(path))
    except UnreadableTensorFile as err:
        raise ModelLoadError(f"{err}: use the model's .safetensors version") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return {k: tuple(v.shape) for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}


def _from_single_file(path: Path) -> ModelHeader:
    shapes = tensor_shapes(path)
    keys = list(shapes)
    if not any(k.startswith(layout.UNET_PREFIX) for k in keys):
        raise ModelLoadError(f"{path} is not a Stable Diffusion checkpoint (no {layout.UNET_PREFIX}* weights)")
    family = family_for_ldm_keys(keys)
    if family is None:
        text = next((k for k in keys if k.startswith(("conditioner.", "cond_stage_model."))), "none")
        raise ModelLoadError(f"{path}: a checkpoint of an unsupported model family (text encoder keys such as "
                             f"{text!r}); Kiln trains {supported_labels()}")
    embeddings = sorted(k for k in keys if k.endswith("token_embedding.weight"))
    widths = tuple(shapes[k][1] for k in embeddings)
    self_attention = {shape[1] for key, shape in shapes.items()
                      if key.startswith(layout.UNET_PREFIX) and key.endswith("attn1.to_k.weight") and len(shape) == 2}
    return ModelHeader(family, layout.ldm_context_dim(shapes), widths, "read from the file's header",
                       sizes_from_shapes(shapes.items(), ldm_part), tuple(sorted(self_attention)))


def read_model_header(path: str, config_dir: str | None = None) -> ModelHeader:
    """The model's family and widths without loading weights; ModelLoadError naming the file when it is none
    Kiln can train."""
    if path.startswith(BUILTIN_PREFIX):
        folder = CONFIG_ROOT / path[len(BUILTIN_PREFIX):]
        return replace(_from_configs(folder, "built-in"), sizes=read_sizes_file(folder / SIZES_FILE))
    target = Path(path).expanduser()
    if target.is_dir():
        return replace(_from_configs(target, "from the folder's configs"), sizes=_safe_folder_sizes(target))
    if target.is_file() and target.suffix.lower() in SINGLE_FILE_SUFFIXES:
        header = _from_single_file(target)
        if config_dir:  # the user's configs describe the file: trust their family and widths
            return replace(_from_configs(Path(config_dir), f"configs in {config_dir}"), sizes=header.sizes)
        return header
    folder = cached_hub_folder(path)
    if folder is None:
        raise ModelLoadError(f"model not found: {path}")
    return replace(_from_configs(folder, "from the cached hub folder's configs"), sizes=_safe_folder_sizes(folder))


def _safe_folder_sizes(folder: Path) -> ModelSizes | None:
    try:
        return folder_sizes(folder)
    except Exception:  # noqa: BLE001 - a damaged weights file is reported when the model loads, not here
        return None


def header_of(parts) -> ModelHeader:
    """The same facts for a model already loaded (merge, compare)."""
    widths = tuple(int(encoder.config.hidden_size) for encoder in parts.text_encoders)
    return ModelHeader(parts.family, parts.unet.config.cross_attention_dim, widths, "loaded",
                       attention_widths=attention_widths(parts.unet.config))
