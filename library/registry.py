"""User-typed names looked up in a registry (optimizers, LR schedulers, ...), forgiving about case and
separators, with a "did you mean" when a name is unknown."""
from __future__ import annotations

import difflib
from typing import Callable


def name_problem(kind: str, name: object, lookup: dict[str, str], normalise: Callable[[str], str],
                 choices: tuple[str, ...]) -> str | None:
    """None when normalise(name) is a key of `lookup` (normalised spelling → registry spelling); otherwise a
    one-line message naming the `kind`, a close match if there is one, and the `choices`."""
    if not isinstance(name, str) or not name.strip():
        return f"{kind} name is empty; choose one of: {', '.join(choices)}"
    if normalise(name) in lookup:
        return None
    close = difflib.get_close_matches(normalise(name), list(lookup), n=1, cutoff=0.5)
    hint = f"did you mean '{lookup[close[0]]}'? " if close else ""
    return f"unknown {kind} '{name}'; {hint}choose one of: {', '.join(choices)}"
