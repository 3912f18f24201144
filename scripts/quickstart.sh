#!/usr/bin/env bash
# Set up, then train a real LoRA on the built-in tiny model and the bundled sample images (~1 minute on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python train_lora.py configs/quickstart_lora.toml "$@"
