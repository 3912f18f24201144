"""Run a queue of Kiln trainings: each config file with the trainer it names, one log per run, a summary
table (also as CSV), Ctrl-C to stop with resumable state, --resume to continue.

    python tools/train_queue.py configs/night/*.toml train.max_steps=800 [--resume] [--queue-dir DIR]

scripts/train_queue.sh and scripts/train_queue.ps1 call this with the project's venv (see README "Batch runs").
"""
from __future__ import annotations

import sys
from pathlib import Path

# tools/ is a subfolder: make `library` importable when run as `python tools/train_queue.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.batch.queue import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
