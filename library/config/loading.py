"""Reading a run config: TOML file + `section.key=value` overrides → one validated, typed config, with every
problem collected and reported together, each with its TOML line or "command-line override".

A file may name a `base` file it builds on (library/config/layers.py). Pure: the only files read are the TOML
files themselves. The run step passes `environment` checks (paths, registries)
that run on the raw data beside the schema, so one run reports every kind of problem at once.
"""
from __future__ import annotations

import difflib
import json
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


# what a strict type error expected, by pydantic error type; and what was given, by Python type of the TOML value
_EXPECTED = {"float_type": "a number", "int_type": "a whole number", "bool_type": "true or false",
             "string_type": "a string (in quotes)", "list_type": "a list", "dict_type": "a table",
             "model_type": "a table", "model_attributes_type": "a table"}
_GIVEN = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
          (list, "a list"), (dict, "a table"))
# pydantic adds the union member's name to the location of errors in unions; dropped from the key shown
_UNION_MEMBERS = {"bool", "literal['auto']", "int", "float", "str", "list[str]"}


def _toml_text(value: Any) -> str:
    """`value` as it is written in TOML, on one line (true, "1e-4", [1, 2], {a = 1})."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string for everything a config holds
    if isinstance(value, list):
        return "[" + ", ".join(_toml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _type_hint(expected_type: str, value: Any) -> str:
    """How to write `value` so it is read as the expected type, when that is clear."""
    if isinstance(value, str) and expected_type in ("float_type", "int_type", "bool_type"):
        if expected_type == "bool_type" and value.strip().lower() in ("true", "false"):
            return f"; write {value.strip().lower()}, without quotes"
        try:
            number = float(value)
        except ValueError:
            return ""
        if expected_type != "bool_type":
            return f"; write it as a number, without quotes: {_toml_text(number)}"
    if isinstance(value, float) and expected_type == "int_type" and value.is_integer():
        return f"; write {int(value)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and expected_type == "string_type":
        return f"; write it in quotes: \"{value}\""
    return ""


def _key_of(error: dict) -> tuple:
    return tuple(p for p in error["loc"] if not (isinstance(p, str) and p in _UNION_MEMBERS))


def _merge_union_errors(errors: list[dict]) -> list[dict]:
    """A value that fits no member of a union gets one error per member from pydantic; they become one error
    ("expected "auto" or true or false, got a string")."""
    merged: list[dict] = []
    for error in errors:
        expected = _EXPECTED.get(error["type"])
        if error["type"] == "literal_error":
            expected = error.get("ctx", {}).get("expected", "").replace("'", '"')
        previous = merged[-1] if merged else None
        if expected and previous and previous.get("expected") and _key_of(previous) == _key_of(error):
            merged[-1] = {**previous, "type": "union", "expected": f"{previous['expected']} or {expected}"}
        else:
            merged.append({**error, "expected": expected} if expected else error)
    return merged


def _type_error_text(error: dict) -> str | None:
    """"expected a number, got a boolean" for a value of the wrong TOML type (the schema is strict: nothing is
    converted), or None for other errors."""
    expected = error["expected"] if error["type"] == "union" else _EXPECTED.get(error["type"])
    if expected is None:
        return None
    value = error.get("input")
    given = next((name for kind, name in _GIVEN if isinstance(value, kind)), type(value).__name__)
    return f"expected {expected}, got {given}{_type_hint(error['type'], value)}"


def _error_text(error: dict, model: type[BaseModel], raw: RawConfig) -> str:
    loc = _key_of(error)
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    where = (raw.origin(loc) if loc else None) or raw.source
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key '{dotted}'{_suggest(model, loc)}"
    if error["type"] == "missing":
        return f"{where}: '{dotted}' is required"
    if loc and (wrong_type := _type_error_text(error)):
        return f"{where}: '{dotted}' = {_toml_text(error.get('input'))}: {wrong_type}"
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
        problems = [line for e in _merge_union_errors(errors) for line in _format_error(e, model, raw)] + problems
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
