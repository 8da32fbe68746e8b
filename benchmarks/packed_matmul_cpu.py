"""The packed CPU matmul (gemma_jax/kernels) vs XLA's dot, same shapes, same run.

    python benchmarks/packed_matmul_cpu.py            # the real 270M's shapes, f32
    python benchmarks/packed_matmul_cpu.py --tiny     # small shapes, a few seconds (the test suite runs this)

Decode shapes: a batch of `rows` times `copies` separate f32 weights [K, N] (the 270M has 18 layers, so 18
copies; one for the [640, 262144] head), in one jitted function, each product feeding the next input so none
is skipped. Reported: ms per call of the whole chain and the weight bytes read per second. XLA's side is
`x @ w`; for the head it reads the model's [V, D] table, as the head's einsum and in the vocabulary-major form
the Sampler uses without the kernel. Prefill shapes
(hundreds to thousands of rows) are compute-bound: reported in GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gemma_jax.kernels import packed_matmul  # noqa: E402

# (name, rows, K, N, copies)
DECODE = [("attn q [640, 1024]", 8, 640, 1024, 18), ("mlp gate+up [640, 4096]", 8, 640, 4096, 18),
          ("mlp down [2048, 640]", 8, 2048, 640, 18), ("head [640, 262144]", 8, 640, 262144, 1),
          ("mlp gate+up, batch 1", 1, 640, 4096, 18), ("head, batch 1", 1, 640, 262144, 1)]
PREFILL = [("prefill 384 rows, mlp", 384, 640, 4096), ("prefill 4096 rows, mlp", 4096, 640, 4096),
           ("prefill 512 rows, head", 512, 640, 262144)]
TINY_DECODE = [("tiny", 8, 64, 96, 3)]
TINY_PREFILL = [("tiny prefill", 40, 64, 96)]


def _time(f, *args, repeats: int) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def _chain(product):
  """x [M, K] through each weight in turn (the next input mixes in the product), as the layers do."""
  def run(x, weights):
    for w in weights:
      y = product(x, w)
      k = x.shape[1]
      x = x + 1e-3 * (y[:, :k] if y.shape[1] >= k else jnp.pad(y, ((0, 0), (0, k - y.shape[1]))))
    return x
  return jax.jit(run)


def decode_case(rows, k, n, copies, repeats):
  keys = jax.random.split(jax.random.key(0), copies + 1)
  weights = [jax.random.normal(keys[i], (k, n)) for i in range(copies)]
  packed = [packed_matmul.pack("MK,KN->MN", w) for w in weights]
  x = jax.random.normal(keys[-1], (rows, k))
  out = {"packed_s": _time(_chain(lambda x, p: packed_matmul.matmul(x, p, n)), x, packed, repeats=repeats)}
  if n < 65536:
    out["xla_s"] = _time(_chain(lambda x, w: x @ w), x, weights, repeats=repeats)
  else:  # the head: XLA reads the model's [V, D] table, in the head's einsum and in the vocabulary-major form
    tables = [jnp.asarray(w.T) for w in weights]  # that the no-kernel Sampler uses (`tied_logits(vocab_major=True)`)
    out["xla_s"] = _time(_chain(lambda x, t: jnp.einsum("BD,VD->BV", x, t)), x, tables, repeats=repeats)
    vocab_major = lambda x, t: jax.lax.optimization_barrier(jnp.einsum("VD,BD->VB", t, x)).T
    out["xla_vocab_major_s"] = _time(_chain(vocab_major), x, tables, repeats=repeats)
  gb = copies * k * n * 4 / 1e9
  return out | {f"{key[:-2]}_gb_s": gb / v for key, v in out.items()}


def prefill_case(rows, k, n, repeats):
  x = jax.random.normal(jax.random.key(1), (rows, k))
  w = jax.random.normal(jax.random.key(2), (k, n))
  p = packed_matmul.pack("MK,KN->MN", w)
  xla = _time(jax.jit(lambda x, w: x @ w), x, w, repeats=repeats)
  ours = _time(jax.jit(lambda x, p: packed_matmul.matmul(x, p, n)), x, p, repeats=repeats)
  gflop = 2 * rows * k * n / 1e9
  return {"xla_s": xla, "packed_s": ours, "xla_gflop_s": gflop / xla, "packed_gflop_s": gflop / ours}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args(argv)
  if not packed_matmul.available():
    print("the packed kernel is unavailable here (CPU with a C++ compiler needed)", file=sys.stderr)
    return 1
  report = {"jax": jax.__version__, "decode": {}, "prefill": {}}
  print(f"{'decode shape':28} {'rows':>4} {'xla ms':>8} {'GB/s':>6} {'packed ms':>9} {'GB/s':>6} {'speedup':>7}")
  for name, rows, k, n, copies in TINY_DECODE if args.tiny else DECODE:
    r = report["decode"][name] = decode_case(rows, k, n, copies, args.repeats)
    print(f"{name:28} {rows:>4} {1e3 * r['xla_s']:8.2f} {r['xla_gb_s']:6.1f} {1e3 * r['packed_s']:9.2f} "
          f"{r['packed_gb_s']:6.1f} {r['xla_s'] / r['packed_s']:6.2f}x"
          + (f"  (vocabulary-major XLA: {1e3 * r['xla_vocab_major_s']:.2f} ms)" if "xla_vocab_major_s" in r else ""))
  print(f"{'prefill shape':28} {'rows':>4} {'xla ms':>8} {'GFLOP/s':>7} {'packed ms':>9} {'GFLOP/s':>7}")
  for name, rows, k, n in TINY_PREFILL if args.tiny else PREFILL:
    r = report["prefill"][name] = prefill_case(rows, k, n, max(3, args.repeats // 5))
    print(f"{name:28} {rows:>4} {1e3 * r['xla_s']:8.1f} {r['xla_gflop_s']:7.0f} {1e3 * r['packed_s']:9.1f} "
          f"{r['packed_gflop_s']:7.0f}")
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
