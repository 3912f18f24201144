"""The names users type for optimizers and LR schedulers, looked up forgiving case and separators, with a "did
you mean" when a name is unknown. Light on purpose (no torch): config checks use it."""
from __future__ import annotations

import difflib
from typing import Callable

from library.errors import UserError


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


OPTIMIZER_NAMES: tuple[str, ...] = (
    "AdamW", "AdamW8bit", "Lion", "DAdaptAdam", "Adafactor", "Prodigy", "SGDNesterov",
)

# Spellings seen in other trainers' configs. Keys are normalised (see _normalise).
_ALIASES: dict[str, str] = {
    "dadaptation": "DAdaptAdam",  # kohya's older spelling
    "dadapt": "DAdaptAdam",
    "bnbadamw8bit": "AdamW8bit",
    "prodigyopt": "Prodigy",
    "nesterov": "SGDNesterov",
}


class OptimizerError(UserError):
    """A user-facing, one-line problem with the optimizer name, its args, or its package."""


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "_- ")


_LOOKUP: dict[str, str] = {_normalise(n): n for n in OPTIMIZER_NAMES} | _ALIASES


def optimizer_name_problem(name: str) -> str | None:
    """None when `name` is a known optimizer (case/underscore-insensitive, common aliases too);
    otherwise a one-line message with a "did you mean" suggestion."""
    return name_problem("optimizer", name, _LOOKUP, _normalise, OPTIMIZER_NAMES)


def canonical_optimizer_name(name: str) -> str:
    """The registry spelling of `name` ("adamw_8bit" -> "AdamW8bit"); OptimizerError if unknown."""
    problem = optimizer_name_problem(name)
    if problem:
        raise OptimizerError(problem)
    return _LOOKUP[_normalise(name)]


SCHEDULER_NAMES: tuple[str, ...] = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)


def _normalise_scheduler(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def scheduler_name_problem(name: str) -> str | None:
    """None when `name` is a known scheduler (case-insensitive, '-' or '_'); else a did-you-mean message."""
    return name_problem("lr scheduler", name, {n: n for n in SCHEDULER_NAMES}, _normalise_scheduler, SCHEDULER_NAMES)


def canonical_scheduler_name(name: str) -> str:
    """The registry spelling of `name` ("Cosine-With-Restarts" -> "cosine_with_restarts"); ValueError if unknown."""
    problem = scheduler_name_problem(name)
    if problem:
        raise ValueError(problem)
    return _normalise_scheduler(name)
