"""Reading a run config: TOML file + `section.key=value` overrides → one validated, typed config, with every
problem collected and reported together, each with its TOML line or "command-line override".

A file may name a `base` file it builds on (library/config/layers.py). Pure: the only files read are the TOML
files themselves. The run step passes `environment` checks (paths, registries)
that run on the raw data beside the schema, so one run reports every kind of problem at once.
"""
from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomli_w
from pydantic import BaseModel, ValidationError

from library.config.layers import EXCLUSIVE_KEYS, Layered, LayerError, read_layers
from library.errors import UserError
from library.config.schema import RunConfig


class ConfigError(UserError, ValueError):
    """All problems found in one config, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=100` → (["train", "max_steps"], 100). Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if (len(keys) < 2 and keys != ["trainer"]) or not all(keys):
        raise ValueError(f"override {text!r}: the key must name a section and a key, like train.max_steps=100")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> set[tuple[str, ...]]:
    """Set each override in `data`; returns the key paths that came from the command line."""
    touched = set()
    for text in overrides:
        keys, value = parse_override(text)
        other = EXCLUSIVE_KEYS.get(tuple(keys))
        if other and isinstance(data.get(other[0]), dict) and other not in touched:
            data[other[0]].pop(other[1], None)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
        touched.add(tuple(keys))
    return touched


@dataclass
class RawConfig:
    """A config's data before validation — its file and bases merged, overrides applied — and where each value
    came from."""

    data: dict
    source: str  # the config file as given (or "(command line)")
    layered: Layered | None
    overridden: set = field(default_factory=set)  # key paths set on the command line

    def origin(self, key: tuple) -> str | None:
        """"file:line", "command-line override", or None for a value no file or override set (a default)."""
        if any(tuple(key[:len(o)]) == o for o in self.overridden):
            return "command-line override"
        found = self.layered.origin(key) if self.layered else None
        if found is None:
            return None
        path, line = found
        return f"{path}:{line}" if line else str(path)

    def folder_of(self, key: tuple) -> Path:
        """The folder relative paths at `key` are resolved against (after the current one): the folder of the
        file that set the value."""
        found = self.layered.origin(key) if self.layered else None
        if found is not None:
            return found[0].parent
        return self.layered.layers[-1].path.parent if self.layered else Path.cwd()


def read_raw_config(path: str | Path | None, overrides: list[str]) -> RawConfig:
    """Read a config file and its bases, and apply overrides; ConfigError for what keeps it from being read."""
    source = str(path) if path else "(command line)"
    layered = None
    if path:
        try:
            layered = read_layers(Path(path))
        except LayerError as err:
            raise ConfigError(source, [str(err)]) from None
    data = layered.data if layered else {}
    try:
        overridden = apply_overrides(data, overrides)
    except ValueError as err:
        raise ConfigError(source, [str(err)]) from None
    return RawConfig(data, source, layered, {tuple(k) for k in overridden})


def _suggest(model: type[BaseModel], loc: tuple) -> str:
    """A "did you mean" for an unknown key, from the fields of the section it was found in."""
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return ""
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        node = inner[0] if inner and isinstance(inner[0], type) else annotation
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(node.model_fields), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(node.model_fields)}"


def _format_error(error: dict, model: type[BaseModel], raw: RawConfig) -> list[str]:
    """One bullet per problem: a validator that finds several reports them one per line."""
    return [line for line in _error_text(error, model, raw).split("\n") if line]


def _error_text(error: dict, model: type[BaseModel], raw: RawConfig) -> str:
    loc = tuple(error["loc"])
    # pydantic adds the union member name to the location of some errors; drop it
    loc = tuple(p for p in loc if not (isinstance(p, str) and p in {"bool", "literal['auto']", "int", "float"}))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    where = (raw.origin(loc) if loc else None) or raw.source
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key '{dotted}'{_suggest(model, loc)}"
    if error["type"] == "missing":
        return f"{where}: '{dotted}' is required"
    message = error["msg"].removeprefix("Value error, ")
    if loc and error["type"] != "value_error":
        return f"{where}: '{dotted}' = {error.get('input')!r}: {message}"
    return "\n".join(f"{where}: {line}" for line in message.split("\n"))


EnvironmentCheck = Callable[[dict, Callable[[tuple], Path]], list[str]]


def validate_raw(raw: RawConfig, model: type[RunConfig], environment: EnvironmentCheck | None = None) -> RunConfig:
    """Validate read data; ConfigError listing every problem. `environment(data, folder_of)` may check (and
    resolve paths in) the raw data first; `folder_of(key)` is the folder of the file that set that key."""
    problems = environment(raw.data, raw.folder_of) if environment else []
    try:
        config = model.model_validate(raw.data)
    except ValidationError as err:
        errors = err.errors()
        wrong_trainer = [e for e in errors if tuple(e["loc"]) == ("trainer",)]
        if wrong_trainer:  # every other problem would only follow from running the wrong script
            raise ConfigError(raw.source, _format_error(wrong_trainer[0], model, raw)) from None
        problems = [line for e in errors for line in _format_error(e, model, raw)] + problems
    if problems:
        raise ConfigError(raw.source, problems)
    return config


def load_config(path: str | Path | None, overrides: list[str], model: type[RunConfig],
                environment: EnvironmentCheck | None = None) -> RunConfig:
    """Read (with its bases), override and validate a config; raise ConfigError listing every problem."""
    return validate_raw(read_raw_config(path, overrides), model, environment)


def config_to_toml(config: RunConfig) -> str:
    """The fully resolved config as TOML (what --print-config shows and what runs record)."""
    data = config.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)
