"""Peak host memory of `python -m gemma_jax.convert` on a synthetic multi-GB checkpoint.

    python benchmarks/convert_memory.py --preset=gemma2-2b --src_dtype=bfloat16 --dtypes=bfloat16,float32

Writes a random-weight HF checkpoint of the preset's shapes (tensor by tensor, safetensors shards of at most
2 GB with an index, like the hub), then runs, each in a fresh subprocess:
  HF -> native   (--dtype=<target>)      and      native -> HF   (the native checkpoint just written)
and records each child's peak resident memory (`wait4` ru_maxrss: the kernel's high-water mark of the
child) next to the size of the model in the target dtype. The interpreter + jax baseline (the CLI's
imports alone) is measured the same way. Prints a markdown table; deletes the synthetic files afterwards
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1024 ** 3
ST_CODES = {"float32": "F32", "bfloat16": "BF16"}
ITEMSIZE = {"float32": 4, "bfloat16": 2}


def write_synthetic_hf(path: str, preset: str, dtype: str, shard_bytes: int = 2 * GB) -> int:
  """A random-weight HF directory with the preset's shapes; returns the number of parameters written.

  Runs in a child process (see main): ru_maxrss of a forked child starts at its parent's resident size, so
  the measuring parent must stay small (no numpy, no jax).
  """
  import ml_dtypes
  import numpy as np
  sys.path.insert(0, ROOT)
  from gemma_jax.convert.hf_config import config_to_hf, hf_vocab_rows
  from gemma_jax.convert.hf_names import hf_shapes
  from gemma_jax.model.config import TransformerConfig
  config = TransformerConfig.from_preset(preset)
  rows = hf_vocab_rows(config)
  shapes = {"model." + n: s for n, s in hf_shapes(config, rows).items()}
  dt = np.dtype({"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype])
  rng = np.random.default_rng(0)
  pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(dt)  # 16M values, sliced per tensor
  shards, cur, size = [], [], 0
  for n, s in shapes.items():
    nbytes = int(np.prod(s)) * dt.itemsize
    if cur and size + nbytes > shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(n)
    size += nbytes
  shards.append(cur)
  os.makedirs(path)
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  total = 0
  for fname, shard in zip(names, shards):
    header, offset = {}, 0
    for n in shard:
      nbytes = int(np.prod(shapes[n])) * dt.itemsize
      header[n] = {"dtype": ST_CODES[dtype], "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(os.path.join(path, fname), "wb") as f:
      f.write(struct.pack("<Q", len(blob)) + blob)
      for n in shard:  # one tensor in memory at a time
        count = int(np.prod(shapes[n]))
        start = int(rng.integers(0, pool.size))
        t = np.resize(np.roll(pool, -start), count)
        f.write(t.view(np.uint8).tobytes())
        total += t.nbytes
        del t
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total},
               "weight_map": {n: fname for fname, shard in zip(names, shards) for n in shard}}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config, rows, dtype=dtype), f, indent=2)
  return total // dt.itemsize


def measure(cmd: list[str]) -> tuple[float, float, str]:
  """Runs `cmd`; returns (peak RSS in bytes, wall seconds, stderr tail). Fails loudly on a non-zero exit."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  err = p.stderr.read().decode(errors="replace")
  _, status, rusage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  if p.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
  return rusage.ru_maxrss * 1024.0, wall, err[-300:]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="gemma2-2b")
  ap.add_argument("--src_dtype", default="bfloat16", choices=sorted(ST_CODES))
  ap.add_argument("--dtypes", default="bfloat16,float32", help="target dtypes of HF -> native, comma-separated")
  ap.add_argument("--workdir", default="/tmp/gemma_jax_convert_memory")
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--_make", help=argparse.SUPPRESS)  # internal: write the synthetic checkpoint here and exit
  args = ap.parse_args()
  if args._make:
    print(write_synthetic_hf(args._make, args.preset, args.src_dtype))
    return

  if os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)
  os.makedirs(args.workdir)
  hf = os.path.join(args.workdir, "hf")
  rows = []
  try:
    t0 = time.perf_counter()
    n_params = int(subprocess.run([sys.executable, os.path.abspath(__file__), f"--preset={args.preset}",
                                   f"--src_dtype={args.src_dtype}", f"--_make={hf}"], check=True,
                                  capture_output=True, text=True).stdout)
    nbytes = n_params * ITEMSIZE[args.src_dtype]
    print(f"synthetic {args.preset} HF checkpoint: {n_params / 1e9:.3f}B params, {nbytes / GB:.2f} GiB "
          f"{args.src_dtype}, in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    base_rss, _, _ = measure([sys.executable, "-c", "import gemma_jax.convert.__main__, gemma_jax.checkpoint, "
                              "gemma_jax.convert.hf, orbax.checkpoint, jax; jax.devices()"])
    cli = [sys.executable, "-m", "gemma_jax.convert"]
    for dtype in args.dtypes.split(","):
      size = n_params * ITEMSIZE[dtype]
      native = os.path.join(args.workdir, f"native_{dtype}")
      rss, wall, _ = measure(cli + [f"--src={hf}", f"--dst={native}", f"--dtype={dtype}"])
      rows.append((f"HF ({args.src_dtype}) -> native ({dtype})", size, rss, wall))
      print(rows[-1], file=sys.stderr)
      out = os.path.join(args.workdir, f"hf_{dtype}")
      rss, wall, _ = measure(cli + [f"--src={native}", f"--dst={out}", "--dst_format=hf"])
      rows.append((f"native ({dtype}) -> HF ({dtype})", size, rss, wall))
      print(rows[-1], file=sys.stderr)
      shutil.rmtree(out)
      shutil.rmtree(native)
  finally:
    if not args.keep:
      shutil.rmtree(args.workdir, ignore_errors=True)

  print(f"\n{args.preset}, {n_params / 1e9:.2f}B parameters; baseline (python + jax + gemma_jax imports): "
        f"{base_rss / GB:.2f} GiB\n")
  print("| conversion | model size in target dtype | peak RSS | peak RSS / model size | peak RSS - baseline "
        "| wall |")
  print("|---|---|---|---|---|---|")
  for name, size, rss, wall in rows:
    print(f"| {name} | {size / GB:.2f} GiB | {rss / GB:.2f} GiB | {rss / size:.2f} | "
          f"{(rss - base_rss) / GB:.2f} GiB | {wall:.0f} s |")


if __name__ == "__main__":
  main()
