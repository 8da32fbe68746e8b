#!/usr/bin/env bash
# Sets up .venv and runs the main job: the real Gemma 3 270M base model turned into a chat model with ORPO on
# the bundled demo pairs, evaluated before and after (python -m train.demo; extra flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m train.demo "$@"
