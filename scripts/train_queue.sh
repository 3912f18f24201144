#!/usr/bin/env bash
# Run a queue of trainings: each config with the trainer it names, one log per run, a summary table + CSV.
#   bash scripts/train_queue.sh configs/night/*.toml train.max_steps=800
#   bash scripts/train_queue.sh --resume configs/night/*.toml train.max_steps=800   # after Ctrl-C or a crash
# Ctrl-C stops the current run with a resumable state and skips the rest; the exit code is non-zero when a
# run failed. The logic lives in library/batch/queue.py (shared with train_queue.ps1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${KILN_PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "error: $PY not found: run 'bash scripts/setup.sh' first (or set KILN_PYTHON)" >&2
  exit 2
fi
export PYTHONUTF8=1
# exec: the queue gets Ctrl-C directly and its exit code is the script's
exec "$PY" -X utf8 "$ROOT/tools/train_queue.py" "$@"
