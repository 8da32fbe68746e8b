#!/usr/bin/env bash
# Sets up .venv and runs the tests; extra pytest arguments pass through.
#   bash scripts/test.sh          the unit tests: everything but the `slow` tests (11-14 min on 2 cores)
#   bash scripts/test.sh --slow   the end-to-end tests: the real Gemma 3 270M, the main job (train.demo) shortened,
#                                 the scripts run as processes, LoRA and Gemma 4 runs (about 20 min on 2 cores)
#   bash scripts/test.sh --all    both (CI runs the two tiers one after the other: .ci/run)
# pytest-xdist workers: one per core plus one (the tests wait on subprocesses and disk a fifth of the time), at
# most 4 (each holds a few GiB); GEMMA_JAX_TEST_WORKERS overrides (0 or 1: no workers).
# Whole files go to one worker (--dist loadfile), so module fixtures (converted models, workspaces) are built once,
# in the order tests/conftest.py gives (longest first; --no-loadscope-reorder keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
marks=(-m "not slow")
case "${1:-}" in
  --slow) marks=(-m slow); shift ;;
  --all) marks=(); shift ;;
esac
bash scripts/setup.sh
cores=$(nproc 2>/dev/null || echo 2)
workers=${GEMMA_JAX_TEST_WORKERS:-$(( cores < 3 ? cores + 1 : 4 ))}
if [ "$workers" -gt 1 ]; then
  exec .venv/bin/python -m pytest -q ${marks[@]+"${marks[@]}"} -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
fi
exec .venv/bin/python -m pytest -q ${marks[@]+"${marks[@]}"} "$@"
