"""The error every dataset check raises: every problem the scan found, each naming the path and what to do,
counted and grouped by kind so one run lists them all."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

# kind → (group title, advice for the whole group, or "" when each problem says what to do)
KINDS: dict[str, tuple[str, str]] = {
    "location": ("dataset folders", ""),
    "name": ("folder names", "name each folder NN_name: NN = repeats per epoch, name = class tokens"),
    "no_images": ("folders without images", ""),
    "caption": ("captions that cannot be read",
                "fix them, or set dataset.skip_bad_images = true to train without their images"),
    "image": ("images that cannot be read",
              "fix or remove them, or set dataset.skip_bad_images = true to train without them"),
    "left_out": ("images left out by dataset.skip_bad_images = true",
                 "no training image is left without them: fix them"),
    "other": ("other problems", ""),
}
GROUP_LIMIT = 20  # bullets shown per group; the rest are counted


@dataclass(frozen=True)
class DatasetProblem:
    kind: str  # a key of KINDS
    text: str  # names the path, what is wrong and (unless the group's advice says it) what to do


def _as_problem(problem: str | DatasetProblem) -> DatasetProblem:
    return problem if isinstance(problem, DatasetProblem) else DatasetProblem("other", problem)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def dataset_report(problems: list[DatasetProblem], where: list[Path] = (), notes: list[str] = ()) -> str:
    """One problem whose group needs no advice: its own line. Otherwise "dataset: N problems in <where>" and
    one block per kind, "<title> (count): <advice>", then a bullet per problem (GROUP_LIMIT at most).
    `notes`: what else the scan noticed, listed after the problems (not errors, but often the cause)."""
    if len(problems) == 1 and not KINDS[problems[0].kind][1]:
        lines = [problems[0].text]
    else:
        place = f" in {', '.join(str(p) for p in where)}" if where else ""
        lines = [f"dataset: {_plural(len(problems), 'problem')}{place}"]
        for kind, (title, advice) in KINDS.items():
            group = [p.text for p in problems if p.kind == kind]
            if not group:
                continue
            lines.append(f"  {title} ({len(group)}){': ' + advice if advice else ''}")
            lines.extend(f"    - {text}" for text in group[:GROUP_LIMIT])
            if len(group) > GROUP_LIMIT:
                lines.append(f"    ... and {len(group) - GROUP_LIMIT} more")
    if notes:
        lines.append("  also noticed (not errors):")
        lines.extend(f"    - {note}" for note in notes)
    return "\n".join(lines)


class DatasetError(UserError, ValueError):
    """One or more dataset problems; each message names the path and what to do.

    `problems`: texts (kind "other") or DatasetProblems; `where`: the dataset folders, for the header;
    `notes`: what else the scan noticed. `.problems` holds the texts, `.items` the DatasetProblems."""

    def __init__(self, problems: str | DatasetProblem | list[str | DatasetProblem], where: list[Path] = (),
                 notes: list[str] = ()):
        given = [problems] if isinstance(problems, (str, DatasetProblem)) else list(problems)
        self.items = [_as_problem(p) for p in given]
        self.problems = [p.text for p in self.items]
        super().__init__(dataset_report(self.items, list(where), list(notes)))
