#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU, tiny models; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest tests -q "$@"
