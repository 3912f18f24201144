"""The converters the importer's rules (rules.py) are made of: an sd-scripts value → the Kiln values it sets,
or NotImported saying why it cannot be brought over."""
from __future__ import annotations

from typing import Any, Callable

Values = dict[str, Any]  # "section.key" → value


class NotImported(ValueError):
    """This option's value cannot be brought over (the message says why)."""


# convert(value, all options, skip) → Kiln values; skip(option, value, reason) records a part left out
Converter = Callable[[Any, dict, Callable[[str, Any, str], None]], Values]


def to_key(key: str, transform: Callable[[Any], Any] = lambda v: v) -> Converter:
    """The value (transformed) to one Kiln key."""
    return lambda value, options, skip: {key: transform(value)}


def whole(value: Any) -> int:
    """A whole number (older GUIs save 64.0); NotImported otherwise."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise NotImported(f"{value!r} is not a whole number")


def needs(other: str, key: str, cast: Callable[[Any], Any] = lambda v: v) -> Converter:
    """An option that does nothing without `other` (sd-scripts ignores it, Kiln refuses it): imported with it."""
    def convert(value: Any, options: dict, skip) -> Values:
        if not options.get(other):
            raise NotImported(f"no effect without {other}")
        return {key: cast(value)}
    return convert



def huber(key: str) -> Converter:
    """huber_c / huber_schedule / huber_scale: only with a Huber loss (and huber_scale not with the snr
    schedule, where sd-scripts ignores it)."""
    def convert(value: Any, options: dict, skip) -> Values:
        if options.get("loss_type") not in ("huber", "smooth_l1"):
            raise NotImported("no effect without loss_type huber or smooth_l1")
        if key == "huber_scale" and options.get("huber_schedule", "snr") == "snr":
            raise NotImported("sd-scripts ignores huber_scale with huber_schedule snr")
        return {f"train.{key}": float(value) if key != "huber_schedule" else value}
    return convert


def fresh_pixels(key: str, transform: Callable[[Any], Any] = lambda v: v) -> Converter:
    """color_aug / face_crop_aug_range change the pixels every step: latents are then encoded every step, as
    sd-scripts does (it makes such datasets uncacheable)."""
    return lambda value, options, skip: {f"dataset.{key}": transform(value), "dataset.cache_latents": "off"}


def pair(value: Any) -> list[float]:
    """sd-scripts' "low,high" (or a TOML pair) → [low, high]."""
    parts = [float(p) for p in str(value).replace("[", "").replace("]", "").split(",")] \
        if not isinstance(value, list) else [float(v) for v in value]
    if len(parts) != 2:
        raise NotImported(f"{value!r} is not \"low,high\"")
    return parts
