"""Writes the bundled demo preference data: data/demo/{train,eval}.jsonl and data/demo/README.md.

    python tools/make_demo_data.py             # from the repository root
    python tools/make_demo_data.py --out=DIR   # somewhere else (e.g. to compare)

Deterministic: the records come from `gemma_jax.data.demo_pairs` (seed and version there), so rerunning it
rewrites the same bytes; tests/test_data_demo_pairs.py checks the committed files against it.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's gemma_jax, not an installed one

from gemma_jax.data import demo_pairs  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "data", "demo"), help="output directory")
  parser.add_argument("--seed", type=int, default=demo_pairs.SEED)
  args = parser.parse_args()
  for path in demo_pairs.write_demo_data(args.out, seed=args.seed):
    print(f"wrote {os.path.relpath(path)} ({os.path.getsize(path)} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
