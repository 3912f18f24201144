"""TensorBoard on a run's or a queue's log folder (localhost, the first free port from 6006).

    python tools/launch_tensorboard.py output/quickstart/logs
    python tools/launch_tensorboard.py logs/queue-20250101-230000      # every run of a queue

scripts/tensorboard.sh and scripts/tensorboard.ps1 call this with the project's venv.
"""
from __future__ import annotations

import sys
from pathlib import Path

# tools/ is a subfolder: make `library` importable when run as `python tools/launch_tensorboard.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.batch.tensorboard import tensorboard_argv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    sys.argv = tensorboard_argv(argv)
    from tensorboard.main import run_main  # imported late: slow, and --help should not wait for it

    run_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
