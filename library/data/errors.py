"""The error every dataset check raises: one or more problems, each naming the path and what to do."""
from __future__ import annotations

from library.errors import UserError


class DatasetError(UserError, ValueError):
    """One or more dataset problems; each message names the path and what to do."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} dataset problems:\n" + "\n".join(f"- {p}" for p in self.problems)
        super().__init__(text)
