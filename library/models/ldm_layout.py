"""Key layout of original Stable Diffusion (LDM) single-file checkpoints, written from diffusers models.

A1111, ComfyUI and sd-scripts read one ``.safetensors`` holding ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE) and ``cond_stage_model.*`` (text encoder). diffusers ships only the reading
direction; this module is the writing direction. Each component is converted by a table of module-prefix
rules derived from the model's diffusers config, and every tensor must match exactly one rule: a key
without a rule is an error, never silently dropped.

Text-encoder names are spelled out in full (transformers 5 dropped the ``text_model.`` prefix from
CLIPTextModel's state dict, but the file format still needs it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from library.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD1: OpenAI CLIP via transformers
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP ViT-H text tower
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL TE1: OpenAI CLIP ViT-L, HF names
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL TE2: OpenCLIP ViT-bigG, OpenCLIP names
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")  # every text encoder's weights, whatever the family


class LayoutError(UserError, ValueError):
    """A state dict does not fit the layout being converted."""


@dataclass(frozen=True)
class _Rule:
    """Map the diffusers module ``src`` (a key prefix) to the LDM module ``dst``.

    ``renames`` rename the leading part of what follows the prefix (e.g. ``norm1`` → ``in_layers.0``);
    ``conv1x1`` turns 2-D linear weights into the 1x1 convolution weights the original VAE uses.
    """

    src: str
    dst: str
    renames: tuple[tuple[str, str], ...] = ()
    conv1x1: bool = False

    def convert(self, rest: str) -> str:
        for old, new in self.renames:
            if rest.startswith(old + "."):
                return self.dst + new + rest[len(old) :]
        return self.dst + rest


_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _has_attention(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def unet_rules(config: Mapping) -> list[_Rule]:
    """Prefix rules for a UNet2DConditionModel with the given config (SD1/SD2/SDXL block structure).

    LDM numbers blocks flatly: ``input_blocks.0`` is conv_in, then for each down block ``layers_per_block``
    (resnet, attention) pairs followed by one downsampler block; each up block has ``layers_per_block + 1``
    pairs and its upsampler sits after the attention (``.2``) or, without attention, after the resnet (``.1``).
    SDXL's size/pooled-text embedding (``add_embedding``) is the original's ``label_emb.0``.
    """
    layers = int(config["layers_per_block"])
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    count = len(down_types)
    rules = [
        _Rule("time_embedding.linear_1.", "time_embed.0."),
        _Rule("time_embedding.linear_2.", "time_embed.2."),
        _Rule("add_embedding.linear_1.", "label_emb.0.0."),
        _Rule("add_embedding.linear_2.", "label_emb.0.2."),
        _Rule("conv_in.", "input_blocks.0.0."),
        _Rule("conv_norm_out.", "out.0."),
        _Rule("conv_out.", "out.2."),
        _Rule("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        _Rule("mid_block.attentions.0.", "middle_block.1."),
        _Rule("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i in range(count):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            rules.append(_Rule(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _UNET_RESNET))
            if _has_attention(down_types[i]):
                rules.append(_Rule(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1."))
        if i < count - 1:
            rules.append(_Rule(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            rules.append(_Rule(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", _UNET_RESNET))
            if _has_attention(up_types[i]):
                rules.append(_Rule(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1."))
        if i < count - 1:
            slot = 2 if _has_attention(up_types[i]) else 1
            rules.append(_Rule(f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (layers + 1) + layers}.{slot}."))
    return rules


def unet_module_namer(config: Mapping) -> Callable[[str], str]:
    """A function from a diffusers UNet module path (``down_blocks.1.attentions.0.proj_in``) to the module's
    path in the original layout (``input_blocks.4.1.proj_in``): what SDXL LoRA files name modules after.
    LayoutError for a path no rule covers."""
    rules = unet_rules(config)

    def name(path: str) -> str:
        key = path + "."
        rule = next((r for r in rules if key.startswith(r.src)), None)
        if rule is None:
            raise LayoutError(f"UNet module {path!r} has no place in the original SD layout")
        return rule.convert(key[len(rule.src):]).rstrip(".")

    return name


def vae_rules(config: Mapping) -> list[_Rule]:
    """Prefix rules for an AutoencoderKL; the LDM decoder numbers its up blocks in reverse."""
    layers = int(config["layers_per_block"])
    count = len(config["block_out_channels"])
    rules = [_Rule(f"{name}.", f"{name}.") for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [
            _Rule(f"{part}.conv_in.", f"{part}.conv_in."),
            _Rule(f"{part}.conv_out.", f"{part}.conv_out."),
            _Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
            _Rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
            _Rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
            _Rule(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION, conv1x1=True),
        ]
    for i in range(count):
        up = count - 1 - i
        for j in range(layers):
            rules.append(_Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        for j in range(layers + 1):
            rules.append(_Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET))
        if i < count - 1:
            rules.append(_Rule(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            rules.append(_Rule(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    return rules


def _apply_rules(rules: Sequence[_Rule], state_dict: Mapping[str, torch.Tensor], prefix: str, what: str) -> dict:
    """Rename every key by the unique rule whose prefix it starts with; unknown keys raise LayoutError."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        rule = next((r for r in rules if key.startswith(r.src)), None)
        if rule is None:
            unmapped.append(key)
            continue
        if rule.conv1x1 and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[prefix + rule.convert(key[len(rule.src) :])] = tensor
    if unmapped:
        raise LayoutError(
            f"{what}: {len(unmapped)} weights have no place in the original SD layout (e.g. {unmapped[:3]}); "
            "this architecture cannot be saved as a single-file SD checkpoint, save a diffusers folder instead"
        )
    return out


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict → ``model.diffusion_model.*`` keys."""
    return _apply_rules(unet_rules(config), state_dict, UNET_PREFIX, "UNet")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict → ``first_stage_model.*`` keys (mid attention as 1x1 convs)."""
    return _apply_rules(vae_rules(config), state_dict, VAE_PREFIX, "VAE")


# transformers CLIPTextModel keys, with or without the "text_model." prefix older versions used.
_CLIP_LAYER = r"encoder\.layers\.(\d+)\."
_CLIP_KEYS = re.compile(
    r"(embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias))"
)
# OpenCLIP names for everything except the fused q/k/v projection (handled in openclip_text_to_ldm).
_OPENCLIP_TABLE = (
    (re.compile(r"embeddings\.token_embedding\.weight"), "token_embedding.weight"),
    (re.compile(r"embeddings\.position_embedding\.weight"), "positional_embedding"),
    (re.compile(r"final_layer_norm\.(weight|bias)"), r"ln_final.\1"),
    (re.compile(_CLIP_LAYER + r"layer_norm1\.(weight|bias)"), r"transformer.resblocks.\1.ln_1.\2"),
    (re.compile(_CLIP_LAYER + r"layer_norm2\.(weight|bias)"), r"transformer.resblocks.\1.ln_2.\2"),
    (re.compile(_CLIP_LAYER + r"mlp\.fc1\.(weight|bias)"), r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (re.compile(_CLIP_LAYER + r"mlp\.fc2\.(weight|bias)"), r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (re.compile(_CLIP_LAYER + r"self_attn\.out_proj\.(weight|bias)"), r"transformer.resblocks.\1.attn.out_proj.\2"),
)
_QKV = re.compile(_CLIP_LAYER + r"self_attn\.(q|k|v)_proj\.(weight|bias)")


def _strip_text_model(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def clip_text_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD1 text encoder (SDXL's first) → ``cond_stage_model.transformer.text_model.*`` (SDXL: ``prefix``), the
    original's own CLIP names.

    ``position_ids`` is written too: older transformers, which A1111 still uses, kept it in the state dict.
    """
    flat = _strip_text_model(state_dict)
    unknown = [k for k in flat if not _CLIP_KEYS.fullmatch(k)]
    if unknown:
        raise LayoutError(f"text encoder: unexpected CLIP weights {unknown[:3]}; is this a CLIPTextModel?")
    out = {prefix + k: v for k, v in flat.items()}
    positions = flat["embeddings.position_embedding.weight"].shape[0]
    out[prefix + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    return out


def openclip_text_to_ldm(state_dict: Mapping[str, torch.Tensor],
                         prefix: str = OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD2 text encoder (SDXL's second) → OpenCLIP ``cond_stage_model.model.*`` (SDXL: ``prefix``) with
    q/k/v fused into ``in_proj_*``.

    SD2 uses the penultimate of OpenCLIP's 24 layers, so diffusers models hold 23 and the last block (and
    the unused ``text_projection``) cannot be written; the SD2 readers load such files without them.
    SDXL's CLIPTextModelWithProjection has all its layers and a projection: OpenCLIP stores that as the
    matrix the pooled state is multiplied by (``x @ text_projection``), the transpose of the Linear weight.
    """
    flat = _strip_text_model(state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        match = _QKV.fullmatch(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = tensor
            continue
        for pattern, template in _OPENCLIP_TABLE:
            if pattern.fullmatch(key):
                out[prefix + pattern.sub(template, key)] = tensor
                break
        else:
            raise LayoutError(f"text encoder: unexpected CLIP weight {key!r}; is this a CLIPTextModel?")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise LayoutError(f"text encoder layer {layer}: q/k/v {kind} incomplete (have {sorted(parts)})")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return out


def diffusers_to_ldm(
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping,
    text: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Full single-file state dict: the UNet and VAE converted here, `text` already in the single-file names
    (the model family converts its text encoders: ModelFamily.ldm_text_state_dict)."""
    return {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config), **text}


def ldm_context_dim(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The UNet's cross-attention width, read from the first ``attn2.to_k`` weight ([inner, context])."""
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None
