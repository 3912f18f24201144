"""The base class of every expected problem: a bad config, dataset, file or setting. Command lines print such
an error as one line (or one list) and exit with code 2; anything else is a bug and says so
(library/cli.py)."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the key, file or folder and what to do."""
