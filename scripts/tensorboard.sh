#!/usr/bin/env bash
# TensorBoard on a run's log folder or a queue's folder, with the project's venv (localhost, free port).
#   bash scripts/tensorboard.sh output/quickstart/logs
#   bash scripts/tensorboard.sh logs/queue-20250101-230000 --port 6010
# Every trainer prints this command for its own run when it starts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${KILN_PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "error: $PY not found: run 'bash scripts/setup.sh' first (or set KILN_PYTHON)" >&2
  exit 2
fi
export PYTHONUTF8=1
exec "$PY" -X utf8 "$ROOT/tools/launch_tensorboard.py" "$@"
