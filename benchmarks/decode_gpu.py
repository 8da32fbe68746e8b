"""Decode speed on one GPU: a gemma2-2b-size model with random bf16 weights, batch 1 and 64, vs HBM roofline.

    python benchmarks/decode_gpu.py                        # on a GPU machine (H100: 3.35 TB/s HBM)
    python benchmarks/decode_gpu.py --hbm_tb_s=4.8         # H200
    python benchmarks/decode_gpu.py --tiny                 # a tiny model on CPU: checks that it runs

Times the jitted decode loop alone (prefill excluded; reported separately as time to first token), on
random prompts of `--prompt_len` tokens and exactly `--new_tokens` greedy tokens per row. The roofline:
parameter bytes + the KV cache bytes read per step, over the step time, against `--hbm_tb_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="gemma2-2b")
  ap.add_argument("--batch_sizes", default="1,64")
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--hbm_tb_s", type=float, default=3.35, help="the accelerator's memory bandwidth (H100: 3.35)")
  ap.add_argument("--tiny", action="store_true", help="a tiny model (runs anywhere, e.g. CPU)")
  args = ap.parse_args(argv)

  import jax
  import numpy as np
  from gemma_jax.model import TransformerConfig, init_params
  from gemma_jax.sampling import SamplingParams
  from gemma_jax.sampling.engine import Sampler
  from gemma_jax.sampling.stopping import StopRules

  if args.tiny:
    config = TransformerConfig.gemma2_2b(num_layers=2, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
                                         head_dim=16, vocab_size=512, query_pre_attn_scalar=16,
                                         sliding_window_size=32, dtype=args.dtype, param_dtype=args.dtype)
    args.prompt_len, args.new_tokens = min(args.prompt_len, 24), min(args.new_tokens, 16)
  else:
    config = TransformerConfig.from_preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
  params = init_params(config, jax.random.key(0))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  sampler = Sampler(config, params, tokenizer=None)
  greedy, stop = SamplingParams(), StopRules(())
  rng = np.random.default_rng(0)
  results = {"device": str(jax.devices()[0]), "preset": config.preset, "dtype": args.dtype,
             "param_bytes": param_bytes, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
  print(f"{jax.devices()[0]}: {config.preset} {args.dtype}, {param_bytes / 1e9:.2f} GB of parameters",
        file=sys.stderr)
  for b in [int(x) for x in args.batch_sizes.split(",")]:
    rows = rng.integers(10, config.vocab_size, (b, args.prompt_len)).tolist()

    def once():
      t0 = time.perf_counter()
      state = sampler.start(rows, max_new_tokens=args.new_tokens, sampling=greedy, stop=stop)
      t1 = time.perf_counter()
      state = sampler.decode(state, args.new_tokens, greedy, stop)
      steps = int(state.step) - 1  # blocks
      return t1 - t0, time.perf_counter() - t1, steps, state

    t = time.perf_counter()
    once()
    first = time.perf_counter() - t
    runs = [once() for _ in range(3)]
    ttft, dec, steps, state = min(runs, key=lambda r: r[1])
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.cache))
    step_s = dec / steps
    bw = (param_bytes + cache_bytes) / step_s
    results[b] = {"decode_tok_s": b * steps / dec, "step_ms": 1e3 * step_s, "ttft_s": ttft,
                  "compile_s": first - ttft - dec, "cache_bytes": cache_bytes, "achieved_tb_s": bw / 1e12,
                  "roofline_fraction": bw / (args.hbm_tb_s * 1e12),
                  "roofline_tok_s": b / ((param_bytes + cache_bytes) / (args.hbm_tb_s * 1e12))}
    r = results[b]
    print(f"batch {b:3d}: {r['decode_tok_s']:9.1f} tok/s, step {r['step_ms']:.2f} ms, TTFT {ttft:.3f}s, compile "
          f"{r['compile_s']:.1f}s, {r['achieved_tb_s']:.3f} TB/s = {100 * r['roofline_fraction']:.0f}% of "
          f"{args.hbm_tb_s} TB/s (roofline {r['roofline_tok_s']:.0f} tok/s)", flush=True)
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
