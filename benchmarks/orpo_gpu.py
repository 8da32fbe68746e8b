"""ORPO training throughput on one GPU: a gemma2-2b-size model, sequence 2048, bf16 compute, model FLOPs utilization.

    python benchmarks/orpo_gpu.py                          # on a GPU machine (H100: 989 TFLOP/s dense bf16)
    python benchmarks/orpo_gpu.py --batch_sizes=1,2,4,8,16 --peak_tflops=989
    python benchmarks/orpo_gpu.py --tiny                   # a tiny model on CPU: checks that it runs

For each batch size (pairs per step; rows R = 2 x pairs, every row `--seq_len` tokens, the first quarter the
prompt) it compiles the training loop's jitted ORPO step (random weights, f32 master weights and AdamW state,
`--dtype` compute, per-block remat), times `--steps` steps after one warm-up step, and reports trained tokens/s
and MFU = model FLOPs per step / step time / peak. Model FLOPs are 3x the forward pass (backward = 2x forward;
remat's recomputation is not counted): every matmul of every layer, attention scores and values over the keys
each position really attends to (the sliding window included), and the tied head at every position. The batch
sizes are tried in increasing order; the first that runs out of device memory ends the sweep, and the largest
that ran is reported as the largest batch that fits.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def forward_flops_per_row(config, seq_len: int) -> float:
  """Matmul FLOPs of one forward pass over one row of `seq_len` tokens (the head at every position)."""
  from gemma_jax.model.config import AttentionType
  c = config
  per_token = 2 * (c.num_heads * c.embed_dim * c.head_dim * 2  # q and the attention output projection
                   + 2 * c.num_kv_heads * c.embed_dim * c.head_dim  # k and v
                   + 3 * c.hidden_dim * c.embed_dim)  # gate, up, down
  flops = c.num_layers * per_token * seq_len + 2 * c.vocab_size * c.embed_dim * seq_len
  for kind in c.attention_types:  # scores (q.k) and values (p.v): 2 x 2 x heads x head_dim per attended key
    window = c.sliding_window_size if kind == AttentionType.LOCAL and c.sliding_window_size else seq_len
    keys = sum(min(t + 1, window) for t in range(seq_len))
    flops += 4 * c.num_heads * c.head_dim * keys
  return float(flops)


def preference_batch(rng, pairs: int, seq_len: int, vocab: int):
  """A [1, 2B, T] batch (one microbatch): chosen rows then rejected rows, prompt = the first quarter."""
  import numpy as np
  prompt = rng.integers(10, vocab, (pairs, seq_len // 4))
  rows = [np.concatenate([prompt, rng.integers(10, vocab, (pairs, seq_len - seq_len // 4))], 1) for _ in range(2)]
  tokens = np.concatenate(rows, 0).astype(np.int32)
  target = np.zeros(tokens.shape, bool)
  target[:, seq_len // 4:] = True
  return {"tokens": tokens[None], "input_mask": np.ones(tokens.shape, bool)[None], "target_mask": target[None]}


def is_out_of_memory(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="gemma2-2b")
  ap.add_argument("--seq_len", type=int, default=2048)
  ap.add_argument("--batch_sizes", default="1,2,4,8,16,32", help="pairs per step, tried in this order")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per batch size (after one warm-up step)")
  ap.add_argument("--dtype", default="bfloat16", help="compute dtype (master weights stay f32)")
  ap.add_argument("--remat", default="block", choices=["none", "block", "dots"])
  ap.add_argument("--peak_tflops", type=float, default=989.0, help="dense peak of the device (H100/H200: 989)")
  ap.add_argument("--tiny", action="store_true", help="a tiny model (runs anywhere, e.g. CPU)")
  args = ap.parse_args(argv)

  import jax
  import numpy as np
  from gemma_jax.model import TransformerConfig, init_params
  from gemma_jax.model.transformer import Transformer
  from gemma_jax.training import orpo_loss, state as train_state
  from gemma_jax.training.optim import make_optimizer
  from gemma_jax.training.step import train_step

  if args.tiny:
    config = TransformerConfig.gemma2_2b(num_layers=2, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
                                         head_dim=16, vocab_size=512, query_pre_attn_scalar=16,
                                         sliding_window_size=32, dtype=args.dtype, remat=args.remat)
    args.seq_len, args.steps = min(args.seq_len, 64), min(args.steps, 2)
  else:
    config = TransformerConfig.from_preset(args.preset, dtype=args.dtype, remat=args.remat)
  model = Transformer(config)
  optimizer, schedule = make_optimizer(lr=1e-6, schedule="constant", num_steps=1000, clip_norm=1.0)
  loss_fn = lambda p, b, aux: orpo_loss(p, b, model=model, config=config, beta=0.1)
  step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule),
                 donate_argnums=(0,))
  state = jax.jit(lambda key: train_state.create(init_params(config, key), optimizer, seed=0))(jax.random.key(0))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  row_flops = 3 * forward_flops_per_row(config, args.seq_len)
  results = {"device": str(jax.devices()[0]), "preset": config.preset, "dtype": args.dtype, "remat": args.remat,
             "seq_len": args.seq_len, "params": num_params, "peak_tflops": args.peak_tflops, "runs": {}}
  print(f"{jax.devices()[0]}: {config.preset}, {num_params / 1e9:.2f}B params, {args.dtype} compute, "
        f"remat={args.remat}, sequence {args.seq_len}", file=sys.stderr)
  rng = np.random.default_rng(0)
  largest = None
  for pairs in [int(x) for x in args.batch_sizes.split(",")]:
    batch = preference_batch(rng, pairs, args.seq_len, config.vocab_size)
    try:
      t = time.perf_counter()
      state, metrics = step(state, batch, None)
      jax.block_until_ready(metrics)
      first = time.perf_counter() - t
      times = []
      for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - only out-of-memory ends the sweep; anything else is re-raised
      if not is_out_of_memory(e):
        raise
      print(f"{pairs} pairs: out of device memory", file=sys.stderr)
      results["runs"][pairs] = "out of memory"
      break
    step_s = sorted(times)[len(times) // 2]
    flops = row_flops * 2 * pairs
    run = {"step_s": step_s, "tokens_per_s": 2 * pairs * args.seq_len / step_s, "first_step_s": first,
           "model_tflops_per_step": flops / 1e12, "mfu": flops / step_s / (args.peak_tflops * 1e12),
           "loss": float(metrics["loss"])}
    results["runs"][pairs] = run
    largest = pairs
    print(f"{pairs:3d} pairs ({2 * pairs} rows x {args.seq_len}): step {step_s:.3f}s, "
          f"{run['tokens_per_s']:,.0f} tokens/s, MFU {100 * run['mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s "
          f"(first step incl. compile {first:.1f}s, loss {run['loss']:.3f})", flush=True)
  results["largest_batch_that_fits"] = largest
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
