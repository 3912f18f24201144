#!/usr/bin/env bash
# Create .venv and install Kiln's dependencies (CPU-safe). Re-running is fast: it reinstalls only when a
# requirements file changed. GPU users: see README ("On a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.kiln-requirements
want=$(cat requirements.txt requirements-nodeps.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (first run takes a few minutes)..."
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and exactly pinned, so nothing later pulls a multi-GB CUDA build on a CPU machine
  .venv/bin/python -m pip install -q "$(grep -E '^torch==' requirements.txt)"
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
  echo "$want" > "$stamp"
fi
