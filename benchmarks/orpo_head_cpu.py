"""The output head on the target positions only vs on every position: one ORPO step of the main job's recipe.

    python benchmarks/orpo_head_cpu.py                 # configs/chat_demo.py: real Gemma 3 270M, bf16, 4 pairs
    python benchmarks/orpo_head_cpu.py --steps=5 --config.data.max_length=128

Both sides run the same jitted training step (`step.train_step`, AdamW, donated state) on the same batches of
the bundled demo pairs, with the loss the training loop builds (`objectives.make_loss_fn`); they differ only in
`max_targets`: None (the head on all T - 1 positions, as TRL computes it) or the data's bound
(`RunData.max_targets`). Both must give the same loss at every step. Prints one JSON line per side and the
ratio of their median step times.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gemma_jax import cli  # noqa: E402

_CONFIG = cli.define_config_file("config", os.path.join(ROOT, "configs", "chat_demo.py"), "Run config (recipe).")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps per side (after one compile step).")


def run_side(config, model_config, params, batches, max_targets, steps):
  import jax
  import jax.numpy as jnp

  from gemma_jax.model.transformer import Transformer
  from gemma_jax.training import objectives, optim, state as state_lib
  from gemma_jax.training.step import train_step

  optimizer, schedule = optim.optimizer_from_config(config.optim, 1000)
  loss_fn = objectives.make_loss_fn(config, Transformer(model_config), model_config, max_targets)
  step = jax.jit(lambda s, b: train_step(s, b, None, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule),
                 donate_argnums=(0,))
  state = jax.jit(lambda p: state_lib.create(p, optimizer, seed=0))(jax.tree.map(jnp.array, params))
  times, losses = [], []
  t0 = time.perf_counter()
  for i, batch in enumerate(batches[:steps + 1]):
    t = time.perf_counter()
    state, metrics = step(state, {k: jnp.asarray(v)[None] for k, v in batch.items()})  # one microbatch
    losses.append(float(metrics["loss"]))
    if i:
      times.append(time.perf_counter() - t)
    else:
      first = time.perf_counter() - t0
  return {"max_targets": max_targets, "median_step_s": round(statistics.median(times), 3),
          "step_times_s": [round(x, 3) for x in times], "first_step_incl_compile_s": round(first, 1),
          "losses": [round(x, 5) for x in losses]}


def main(argv):
  del argv
  import dataclasses

  import jax

  from gemma_jax import checkpoint
  from gemma_jax.training import run_data
  from gemma_jax.training.start import resolve_start

  config = _CONFIG.value
  start = resolve_start(config)  # the recipe's model (the real 270M by default), its tokenizer and template
  model_config = dataclasses.replace(start.config, dtype=config.compute_dtype)
  params = checkpoint.load(start.path, dtype="float32").params
  tokenizer, template = start.tokenizer, start.template
  data = run_data.build(config, tokenizer, template, micro_batch=config.batch_size, process_index=0,
                        process_count=1)
  batches = [b for _, b in zip(range(_STEPS.value + 1), data.train)]
  print(f"# {data.summary()}; rows {batches[0]['tokens'].shape}; bound {data.max_targets()} target tokens per "
        f"row; jax {jax.__version__}, {os.cpu_count()} cpus", flush=True)
  every = run_side(config, model_config, params, batches, None, _STEPS.value)
  print(json.dumps({"side": "every position", **every}), flush=True)
  targets = run_side(config, model_config, params, batches, data.max_targets(), _STEPS.value)
  print(json.dumps({"side": "target positions", **targets}), flush=True)
  same = all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(every["losses"], targets["losses"]))
  print(json.dumps({"speedup": round(every["median_step_s"] / targets["median_step_s"], 2),
                    "same_losses": same}), flush=True)
  if not same:
    raise SystemExit("the two heads gave different losses")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
