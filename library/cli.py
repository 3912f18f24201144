"""What every command line does around its `main`: expected problems (library.errors.UserError and its
kinds, disk errors) become one `error:` line and exit code 2; Ctrl-C exits with 130; anything else is a bug,
shown with its traceback and a line asking to report it."""
from __future__ import annotations

import sys
import traceback
from typing import Callable

from library.errors import UserError

BUG_LINE = ("error: this is a bug in Kiln, not a problem with your files or settings; please report it with "
            "the traceback above and the command you ran")


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call `main(argv)` and turn what it raises into an exit code."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a disk or permission problem of the machine, not of Kiln
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the last line of defence: every expected error is a UserError
        traceback.print_exc()
        print(BUG_LINE, file=sys.stderr)
        return 1
