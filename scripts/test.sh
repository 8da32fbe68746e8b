#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (extra pytest arguments pass through).
# pytest-xdist workers: one per core plus one (the tests wait on subprocesses and disk a fifth of the time), at
# most 4 (each holds a few GiB); GEMMA_JAX_TEST_WORKERS overrides (0 or 1: no workers).
# Whole files go to one worker (--dist loadfile), so module fixtures (converted models, workspaces) are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cores=$(nproc 2>/dev/null || echo 2)
workers=${GEMMA_JAX_TEST_WORKERS:-$(( cores < 3 ? cores + 1 : 4 ))}
if [ "$workers" -gt 1 ]; then
  exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
