"""Which modules of a model a network adapts, and the kohya names they carry in files.

Names come from the model family (library/models/families/): SD1/2 UNet modules are named after their diffusers
paths, SDXL's after the original (SGM) block paths, text-encoder modules after the `text_model.` paths every
tool looks up — never derived from today's transformers attribute layout.
"""
from __future__ import annotations

from typing import Callable, Container

from torch import nn

from library.models.parts import ModelParts
from library.networks.base import Target

# Module classes whose Linear / 1x1-conv children are adapted (sd-scripts' choice; what users' files contain).
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
UNET_GROUP = "unet"  # the UNet's learning-rate group; text encoders use their family slot's group


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


def _is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)


def find_targets(model: nn.Module, name_of: Callable[[str], str], blocks: tuple[str, ...],
                 conv_blocks: tuple[str, ...] = ()) -> list[Target]:
    """Adaptable modules inside blocks of the given class names, in module order; `name_of` gives the kohya
    name of a module path."""
    targets: dict[str, Target] = {}
    for block_path, block in model.named_modules():
        block_class = type(block).__name__
        if block_class not in blocks and block_class not in conv_blocks:
            continue
        for child_path, child in block.named_modules():
            if not child_path:
                continue
            path = f"{block_path}.{child_path}"
            conv3 = _is_conv3x3(child) and block_class in conv_blocks
            if (_is_linear_like(child) or conv3) and path not in targets:
                targets[path] = Target(path, name_of(path), conv3)
    return list(targets.values())


def unet_targets(parts: ModelParts, with_conv: bool) -> list[Target]:
    """The UNet's attention/feed-forward layers, plus its ResNet convs with `with_conv` (LoCon)."""
    return find_targets(parts.unet, parts.family.unet_kohya_namer(parts.unet.config), UNET_ATTENTION_BLOCKS,
                        UNET_CONV_BLOCKS if with_conv else ())


def text_encoder_targets(parts: ModelParts, index: int = 0) -> list[Target]:
    """Every attention projection and MLP layer of text encoder `index`: diffusers mis-reads text-encoder
    LoRAs that adapt only some of them (REFERENCE.md), so a network takes all or none."""
    slot = parts.family.text_encoders[index]
    return find_targets(parts.text_encoders[index], lambda path: parts.family.text_encoder_kohya_name(slot, path),
                        TE_BLOCKS)


def network_targets(parts: ModelParts, groups: Container[str], with_conv: bool
                    ) -> list[tuple[str, nn.Module, list[Target]]]:
    """(group, model, targets) for each part a network adapts: the UNet when `groups` holds "unet", each text
    encoder whose slot group it holds; `with_conv` adds the UNet's ResNet convs (LoCon)."""
    found = [(UNET_GROUP, parts.unet, unet_targets(parts, with_conv))] if UNET_GROUP in groups else []
    for index, slot in enumerate(parts.family.text_encoders):
        if slot.group in groups:
            found.append((slot.group, parts.text_encoders[index], text_encoder_targets(parts, index)))
    return found


def module_map(parts: ModelParts) -> dict[str, nn.Module]:
    """kohya name → module for every Linear and Conv2d of the UNet and text encoders (what files may adapt)."""
    modules: dict[str, nn.Module] = {}
    named = [(parts.unet, parts.family.unet_kohya_namer(parts.unet.config))]
    for slot, encoder in zip(parts.family.text_encoders, parts.text_encoders):
        named.append((encoder, lambda path, slot=slot: parts.family.text_encoder_kohya_name(slot, path)))
    for model, name_of in named:
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                modules[name_of(path)] = module
    return modules
