#!/usr/bin/env bash
# Sets up .venv and runs the main job: greedy sampling from the real Gemma 3 270M (extra flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m sample.sample "$@"
