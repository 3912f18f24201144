"""Layered configs: a TOML file may name a `base` file whose values it overrides, to any depth.

    base = "lora_sd15.toml"     # relative to this file; that file may name its own base

Tables merge key by key at every depth; any other value — arrays included, so `[[dataset.subsets]]` — replaces
the base's value whole (a list of folders is one setting: merging them item by item would mix two datasets).
Setting one of an exclusive pair (train.max_steps / train.epochs, optimizer.warmup_steps / warmup_ratio)
drops the other from the base, as a command-line override does. A chain that comes back to a file is refused
with the chain. Every value remembers the file and line that set it, for error messages and
`--print-config --origins`.

Pure: reads only the TOML files themselves.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Key = tuple  # a path into the config data: ("dataset", "subsets", 0, "repeats")

# Keys where setting one replaces the other (from a base file or from the file before a command-line override).
EXCLUSIVE_KEYS = {("train", "max_steps"): ("train", "epochs"), ("train", "epochs"): ("train", "max_steps"),
                  ("optimizer", "warmup_steps"): ("optimizer", "warmup_ratio"),
                  ("optimizer", "warmup_ratio"): ("optimizer", "warmup_steps")}


class LayerError(ValueError):
    """A config file or one of its bases cannot be read, or the chain of bases loops (one line)."""


@dataclass
class Layer:
    path: Path
    data: dict  # the file's own values, `base` removed
    lines: dict  # Key -> line number where the file sets it


@dataclass
class Layered:
    """The merged data of a file and its bases; `layers` runs from the deepest base to the file itself."""

    data: dict
    layers: list[Layer]

    def origin(self, key: Key) -> tuple[Path, int | None] | None:
        """The file (and line) that set the value at `key`, or None when no file set it (a default)."""
        owner = _owner_prefix(self.data, key)
        for layer in reversed(self.layers):
            if _lookup(layer.data, owner) is not _MISSING:
                if _lookup(layer.data, key) is _MISSING:
                    return None  # e.g. a key a subset leaves out, in the file whose subsets won
                return layer.path, _line_of(layer.lines, key)
        return None


_MISSING = object()


def _lookup(data: Any, key: Key) -> Any:
    node = data
    for part in key:
        if isinstance(part, int) and isinstance(node, list) and -len(node) <= part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


def _owner_prefix(data: dict, key: Key) -> Key:
    """The shortest prefix of `key` whose merged value is not a table: that value came whole from one file."""
    for depth in range(1, len(key) + 1):
        if not isinstance(_lookup(data, key[:depth]), dict):
            return key[:depth]
    return key


def _line_of(lines: dict, key: Key) -> int | None:
    for depth in range(len(key), 0, -1):
        if key[:depth] in lines:
            return lines[key[:depth]]
    return None


def read_layers(path: Path) -> Layered:
    """Read `path` and its chain of bases, merged. LayerError (naming the file and line) when one cannot be read,
    a base is missing, or the chain loops."""
    chain: list[Layer] = []
    current, referrer = Path(path), None
    while True:
        if current.resolve() in [layer.path.resolve() for layer in chain]:
            loop = " → ".join(str(p) for p in [*(layer.path for layer in chain), current])
            raise LayerError(f"{_where(chain[-1])}: the chain of base files loops: {loop}")
        layer, base = _read_layer(current, referrer, top=not chain)
        chain.append(layer)
        if base is None:
            break
        referrer = (layer, base)
        current = Path(os.path.normpath(current.parent / base))  # "a/../b.toml" → "b.toml" in messages
    layers = list(reversed(chain))
    merged: dict = {}
    for layer in layers:
        merged = merge(merged, layer.data)
    return Layered(merged, layers)


def _where(layer: Layer) -> str:
    """"file:line" of the layer's `base` key."""
    line = layer.lines.get(("base",))
    return f"{layer.path}:{line}" if line else str(layer.path)


def _read_layer(path: Path, referrer: tuple[Layer, str] | None, top: bool) -> tuple[Layer, str | None]:
    """One file's own data; messages about the config itself read as before, those about a base name it."""
    prefix = "" if top else f"{path}: "
    if not path.is_file():
        if referrer is None:
            raise LayerError(f"config file not found: {path}")
        layer, base = referrer
        raise LayerError(f"{_where(layer)}: base = {base!r}: file not found ({path}; a base is relative to the "
                         "file that names it)")
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise LayerError(f"{prefix}the file is not UTF-8 text; re-save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise LayerError(f"{prefix}not valid TOML: {err}") from None
    layer = Layer(path, data, key_lines(text))
    base = data.pop("base", None)
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise LayerError(f"{_where(layer)}: base = {base!r}: must be the path of a TOML file")
    return layer, base


def merge(base: dict, top: dict) -> dict:
    """`top` over `base`: tables merge key by key, anything else (arrays too) replaces; setting one of an
    exclusive pair drops the other from `base`."""
    result = dict(base)
    for section, key in EXCLUSIVE_KEYS.items():
        other_section, other_key = key
        if isinstance(top.get(section[0]), dict) and section[1] in top[section[0]]:
            table = result.get(other_section)
            if isinstance(table, dict) and other_key in table and other_key not in top[section[0]]:
                result[other_section] = {k: v for k, v in table.items() if k != other_key}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*([^\]]+?)\s*\]\]")
_TABLE_HEADER = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""  # a bare or quoted key
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=(.*)$")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'')


def _dotted(text: str) -> tuple[str, ...]:
    parts = re.findall(r'"[^"]*"|\'[^\']*\'|[^.\s]+', text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def _open_brackets(value: str) -> int:
    bare = re.sub(r"#.*$", "", _STRINGS.sub("", value))
    return bare.count("[") + bare.count("{") - bare.count("]") - bare.count("}")


def key_lines(text: str) -> dict:
    """{Key: line number} for every table header and key of a TOML text (arrays of tables get their index).
    Best effort for message locations: multi-line arrays and strings are skipped over, not parsed."""
    lines: dict = {}
    current: Key = ()
    counts: dict = {}
    depth, in_string = 0, False
    for number, line in enumerate(text.splitlines(), 1):
        if in_string:
            in_string = line.count('"""') % 2 == 0
            continue
        if depth > 0:
            depth += _open_brackets(line)
            continue
        if match := _ARRAY_HEADER.match(line):
            path = _dotted(match.group(1))
            index = counts[path] = counts.get(path, -1) + 1
            current = path + (index,)
            lines.setdefault(path, number)
            lines[current] = number
        elif match := _TABLE_HEADER.match(line):
            current = _dotted(match.group(1))
            lines.setdefault(current, number)
        elif match := _KEY.match(line):
            lines[current + _dotted(match.group(1))] = number
            value = match.group(2)
            in_string = value.count('"""') % 2 == 1
            depth = 0 if in_string else max(_open_brackets(value), 0)
    return lines
