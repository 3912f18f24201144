"""Model families: the one place that knows how SD1, SD2 and SDXL differ.

Add a family: write a `ModelFamily` subclass (base.py says what it owns) in a module here and append its
instance to `FAMILIES`. Detection asks each family in order whether it claims a model.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from library.models.families.base import ModelFamily, TextEncoderSlot
from library.models.families.sd import SD1, SD2
from library.models.families.sdxl import SDXL

FAMILIES: tuple[ModelFamily, ...] = (SD1, SD2, SDXL)

__all__ = ["FAMILIES", "ModelFamily", "TextEncoderSlot", "family_named", "family_for_configs",
           "family_for_ldm_keys", "supported_labels"]


def supported_labels() -> str:
    return ", ".join(family.label for family in FAMILIES)


def family_named(name: str) -> ModelFamily:
    """The family a file or log recorded by name ("sd1"); KeyError for an unknown one."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_for_configs(unet_config: Mapping[str, Any], text_config: Mapping[str, Any]) -> ModelFamily | None:
    """The family whose models have these diffusers configs, or None."""
    return next((f for f in FAMILIES if f.claims_configs(unet_config, text_config)), None)


def family_for_ldm_keys(keys: Sequence[str]) -> ModelFamily | None:
    """The family of an original-layout single file, told by its text-encoder keys, or None."""
    return next((f for f in FAMILIES if f.claims_ldm_keys(keys)), None)
