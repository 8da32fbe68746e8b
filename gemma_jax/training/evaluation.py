"""Evaluation during a run: the mean loss and metrics over the held-out batches, greedy samples of held-out
prompts, and the best model (by eval loss) written to <workdir>/best in our checkpoint format."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import ml_collections
from jax.sharding import Mesh

from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.sharding import ShardingContext
from gemma_jax.training.batches import global_batch, stack_microbatches
from gemma_jax.training.metrics import MetricsWriter
from gemma_jax.training.run_data import RunData
from gemma_jax.training.start import Start, save_model


@dataclasses.dataclass
class Evaluator:
  """What an evaluation reads; `best_loss` is the lowest eval loss so far (saved with the run checkpoints)."""

  config: ml_collections.ConfigDict  # the run config (eval.*, checkpoint.keep_best)
  data: RunData
  eval_step: Callable[[Any, dict[str, jax.Array], Any], dict[str, jax.Array]]  # (params, batch, aux) -> metrics
  mesh: Mesh
  writer: MetricsWriter
  start: Start
  model_config: TransformerConfig  # the training config (dtypes, remat)
  ctx: ShardingContext
  best_loss: float = math.inf

  def __call__(self, state, aux, step: int) -> dict[str, float]:
    """Evaluates `state.params` at `step`, logs the metrics (and samples), writes best/ when the loss improves.

    Returns the eval/* metrics (no samples); {} without a held-out set.
    """
    config, data = self.config, self.data
    if not data.has_eval:
      return {}
    sums: dict[str, float] = {}
    count = 0
    for i, local in enumerate(data.eval_batches()):
      if config.eval.max_batches and i >= config.eval.max_batches:
        break
      host = stack_microbatches([local])
      m = jax.device_get(self.eval_step(state.params, global_batch(host, self.mesh), aux))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      count += 1
    metrics = {f"eval/{k}": v / max(count, 1) for k, v in sums.items()}
    text = {}
    if config.eval.num_samples > 0 and jax.process_count() == 1:  # (multi-host runs log no samples)
      samples = self.greedy_samples(state.params)
      metrics["eval/samples"] = samples
      text = {"eval/samples": "\n\n".join(f"**{s['prompt']}**\n\n{s['completion']}" for s in samples)}
    self.writer.write(step, {k: v for k, v in metrics.items()}, text)
    loss = metrics.get("eval/loss", math.inf)
    if config.checkpoint.keep_best and math.isfinite(loss) and loss < self.best_loss:
      save_model(os.path.join(os.path.dirname(self.writer.path), "best"), state.params, self.start,
                 self.model_config, config, step=step,
                 metrics={k: v for k, v in metrics.items() if k != "eval/samples"})
      self.best_loss = loss  # once best/ is written
    return {k: v for k, v in metrics.items() if k != "eval/samples"}

  def greedy_samples(self, params) -> list[dict[str, str]]:
    """Greedy completions of the first held-out prompts, with the template's stop tokens."""
    from gemma_jax.sampling import Sampler, SamplingParams
    config, start = self.config, self.start
    prompts = self.data.sample_prompts(config.eval.num_samples)
    if not prompts:
      return []
    sampler = Sampler(start.config.replace(param_dtype=self.model_config.param_dtype), params, start.tokenizer,
                      sharding=self.ctx)
    out = sampler.generate([p.tolist() for p in prompts], max_new_tokens=config.eval.sample_tokens,
                           sampling=SamplingParams(), stop_ids=start.template.stop_token_ids(start.tokenizer))
    return [{"prompt": start.tokenizer.decode(p.tolist()), "completion": c.text} for p, c in zip(prompts, out)]
