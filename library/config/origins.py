"""`--print-config --origins`: the resolved config as TOML, each value followed by where it came from — the
file and line that set it (the config or one of its bases), "command-line override", or "default"."""
from __future__ import annotations

from typing import Any

import tomli_w

from library.config.loading import RawConfig
from library.config.schema import RunConfig

_WIDTH = 56  # values are padded to this column so the origins line up (longer ones just push theirs right)


def _value(value: Any) -> str:
    return tomli_w.dumps({"v": value})[len("v = "):].rstrip("\n")


def _line(key: str, value: Any, origin: str | None) -> str:
    text = f"{key} = {_value(value)}"
    return f"{text.ljust(_WIDTH)}  # {origin or 'default'}"


def _table_lines(header: str, table: dict, path: tuple, raw: RawConfig) -> list[str]:
    """`header` and the table's plain values, then its sub-tables and arrays of tables, recursively."""
    lines = [header] if header else []
    nested = []
    for key, value in table.items():
        if isinstance(value, dict) and value:
            nested.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            nested.append((key, value))
        else:
            lines.append(_line(key, value, raw.origin(path + (key,))))
    for key, value in nested:
        dotted = ".".join((*(str(p) for p in path), key))
        if isinstance(value, dict):
            lines += ["", *_table_lines(f"[{dotted}]", value, path + (key,), raw)]
        else:
            for index, item in enumerate(value):
                lines += ["", *_table_lines(f"[[{dotted}]]", item, path + (key, index), raw)]
    return lines


def annotated_toml(config: RunConfig, raw: RawConfig) -> str:
    """The fully resolved config as TOML with a `# origin` comment on every value (see the module docstring)."""
    data = config.model_dump(mode="json", exclude_none=True)
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    lines = _table_lines("", top, (), raw)
    for section, table in data.items():
        if isinstance(table, dict):
            lines += ["", *_table_lines(f"[{section}]", table, (section,), raw)]
    return "\n".join(lines).lstrip("\n") + "\n"
