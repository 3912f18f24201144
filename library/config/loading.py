"""Reading a run config: TOML file + `section.key=value` overrides → one validated, typed config, with every
problem collected and reported together, each with its TOML line or "command-line override".

Pure: the only file read is the TOML itself. The run step passes `environment` checks (paths, registries)
that run on the raw data beside the schema, so one run reports every kind of problem at once.
"""
from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

import tomli_w
from pydantic import BaseModel, ValidationError

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
    if len(keys) < 2 or not all(keys):
        raise ValueError(f"override {text!r}: the key must name a section and a key, like train.max_steps=100")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


# Keys where setting one on the command line replaces the other from the file (steps vs epochs).
EXCLUSIVE_KEYS = {("train", "max_steps"): ("train", "epochs"), ("train", "epochs"): ("train", "max_steps")}


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


def _toml_line(text: str, loc: tuple) -> int | None:
    """Line number of `loc` (section, key, ...) in the TOML text, for error messages. Best effort."""
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return None
    section, key = names[0], names[-1]
    current = ""
    header = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
    for number, line in enumerate(text.splitlines(), 1):
        match = header.match(line)
        if match:
            current = match.group(1).split(".")[0]
            if len(names) == 1 and current == section:
                return number
            continue
        if current == section and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return None


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


def _format_error(error: dict, model: type[BaseModel], text: str, source: str, overridden: set) -> list[str]:
    """One bullet per problem: a validator that finds several reports them one per line."""
    return [line for line in _error_text(error, model, text, source, overridden).split("\n") if line]


def _error_text(error: dict, model: type[BaseModel], text: str, source: str, overridden: set) -> str:
    loc = tuple(error["loc"])
    # pydantic adds the union member name to the location of some errors; drop it
    loc = tuple(p for p in loc if not (isinstance(p, str) and p in {"bool", "literal['auto']", "int", "float"}))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if tuple(str(p) for p in loc) in overridden:
        where = "command-line override"
    else:
        line = _toml_line(text, loc)
        where = f"{source}:{line}" if line else source
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key '{dotted}'{_suggest(model, loc)}"
    if error["type"] == "missing":
        return f"{where}: '{dotted}' is required"
    message = error["msg"].removeprefix("Value error, ")
    if loc and error["type"] != "value_error":
        return f"{where}: '{dotted}' = {error.get('input')!r}: {message}"
    return "\n".join(f"{where}: {line}" for line in message.split("\n"))


EnvironmentCheck = Callable[[dict, Path], list[str]]


def load_config(path: str | Path | None, overrides: list[str], model: type[RunConfig],
                environment: EnvironmentCheck | None = None) -> RunConfig:
    """Read, override and validate a config; raise ConfigError listing every problem. `environment(data,
    config_folder)` may check (and resolve paths in) the raw data before the schema validates it."""
    source = str(path) if path else "(command line)"
    text = ""
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(source, [f"config file not found: {path}"])
        try:
            text = path.read_text(encoding="utf-8-sig")
            data = tomllib.loads(text)
        except UnicodeDecodeError:
            raise ConfigError(source, ["the file is not UTF-8 text; re-save it as UTF-8"]) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(source, [f"not valid TOML: {err}"]) from None
    else:
        data = {}
    try:
        overridden = apply_overrides(data, overrides)
    except ValueError as err:
        raise ConfigError(source, [str(err)]) from None
    overridden = {tuple(k) for k in overridden}
    # the run step's file-system and registry checks see the raw data, so they are reported beside schema errors
    problems = environment(data, Path(path).parent if path else Path.cwd()) if environment else []
    try:
        config = model.model_validate(data)
    except ValidationError as err:
        problems = [line for e in err.errors() for line in _format_error(e, model, text, source, overridden)] + problems
    if problems:
        raise ConfigError(source, problems)
    return config


def config_to_toml(config: RunConfig) -> str:
    """The fully resolved config as TOML (what --print-config shows and what runs record)."""
    data = config.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)
