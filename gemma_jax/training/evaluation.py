"""Evaluation during a run: the loss and metrics of every held-out example (each scored alone, the mean over
examples; the last batch padded with empty pairs that count for nothing), greedy samples of held-out prompts
and their stop rate, a progress bar and a one-line console summary, and the best model (by eval loss)
written to <workdir>/best in our checkpoint format."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
from jax.sharding import Mesh

from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.sharding import ShardingContext
from gemma_jax.progress import progress_bar
from gemma_jax.training.batches import global_batch, stack_microbatches
from gemma_jax.training.metrics import MetricsWriter
from gemma_jax.training.run_data import RunData
from gemma_jax.training.start import Start, save_model, saved_model_config


EVAL_PREFIX = "eval_"  # TRL's names: eval_loss, eval_rewards/accuracies, ...
SAMPLES_KEY = "eval_greedy_samples"  # the greedy samples (text) of an evaluation row
STOP_RATE_KEY = "eval_stop_rate"  # fraction of greedy samples that ended with a stop token
MERGE_KEY = "eval_merge_alpha"  # on the row that evaluates the final model merged toward the start (merge_alpha)
SUMMARY_KEYS = ("rewards/accuracies", "rewards/margins", "nll_loss")  # on the console line, when present


@dataclasses.dataclass
class Evaluator:
  """What an evaluation reads; `best_loss` is the lowest eval loss so far (saved with the run checkpoints)."""

  config: ml_collections.ConfigDict  # the run config (eval.*, checkpoint.keep_best, progress)
  data: RunData
  eval_step: Callable[[Any, dict[str, jax.Array], Any], dict[str, jax.Array]]  # -> {"count", <name>: sum}
  mesh: Mesh
  writer: MetricsWriter
  start: Start
  model_config: TransformerConfig  # the training config (dtypes, remat)
  ctx: ShardingContext
  best_loss: float = math.inf
  echo: Callable[[str], None] | None = None  # prints the one-line summary (process 0); None = silent
  stop_rate: float | None = None  # of the latest evaluation's greedy samples

  def num_batches(self) -> int:
    """Held-out batches one evaluation reads (the last one partial, padded)."""
    n = -(-len(self.data.eval_data.examples) // self.data.micro_batch)
    return min(n, self.config.eval.max_batches) if self.config.eval.max_batches else n

  def __call__(self, state, aux, step: int, save_best: bool = True,
               extra: dict[str, Any] | None = None) -> dict[str, float]:
    """Evaluates `state.params` at `step`, logs the metrics (and samples, and `extra`), writes best/ when the
    loss improves (and `save_best`).

    Every held-out example is scored once (the last batch is padded with empty rows, which count for
    nothing); a metric is the mean over examples. Returns the eval_* metrics (no samples); {} without a
    held-out set.
    """
    config, data = self.config, self.data
    if not data.has_eval:
      return {}
    t0 = time.perf_counter()
    total = self.num_batches()
    primary = jax.process_index() == 0
    bar = progress_bar(total=total, desc=f"eval (step {step})", unit="batch",
                       disable=not (config.progress and primary))
    sums: dict[str, float] = {}
    try:
      for i, local in enumerate(data.eval_batches()):
        if i >= total:
          break
        host = stack_microbatches([local])
        m = jax.device_get(self.eval_step(state.params, global_batch(host, self.mesh), aux))
        for k, v in m.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        bar.update(1)
    finally:
      bar.close()
    count = sums.pop("count", 0.0)
    metrics: dict[str, Any] = {EVAL_PREFIX + k: v / max(count, 1.0) for k, v in sums.items()}
    metrics[EVAL_PREFIX + "examples"] = int(count)
    text = {}
    if config.eval.num_samples > 0 and jax.process_count() == 1:  # (multi-host runs log no samples)
      samples = self.greedy_samples(state.params)
      if samples:
        self.stop_rate = sum(s["stopped"] for s in samples) / len(samples)
        metrics[STOP_RATE_KEY] = self.stop_rate
        metrics[SAMPLES_KEY] = samples
        text = {SAMPLES_KEY: "\n\n".join(f"**{s['prompt']}**\n\n{s['completion']}" for s in samples)}
    metrics[EVAL_PREFIX + "runtime"] = time.perf_counter() - t0
    metrics.update(extra or {})
    self.writer.write(step, metrics, text)
    scalars = {k: v for k, v in metrics.items() if k != SAMPLES_KEY}
    if self.echo is not None and primary:
      self.echo(summary_line(step, scalars))
    loss = metrics.get(EVAL_PREFIX + "loss", math.inf)
    if save_best and config.checkpoint.keep_best and math.isfinite(loss) and loss < self.best_loss:
      save_model(os.path.join(os.path.dirname(self.writer.path), "best"), state.params, self.start,
                 self.model_config, config, step=step, metrics=scalars, examples=self.examples(),
                 stop_rate=self.stop_rate)
      self.best_loss = loss  # once best/ is written
    return scalars

  def examples(self) -> dict[str, int]:
    """The data sizes recorded in a saved model's provenance."""
    out = {"train_examples": self.data.train_examples}
    if self.data.has_eval:
      out["eval_examples"] = len(self.data.eval_data.examples)
    return out

  def greedy_samples(self, params) -> list[dict[str, Any]]:
    """Greedy completions of the first held-out prompts, with the template's stop tokens.

    Each: {"prompt", "completion", "stopped"}; stopped: it ended with a stop token (end of turn / eos) within
    eval.sample_tokens.
    """
    from gemma_jax.sampling import Sampler, SamplingParams
    config, start = self.config, self.start
    prompts = self.data.sample_prompts(config.eval.num_samples)
    if not prompts:
      return []
    # One device: unsharded, so the sampler takes the backend's fastest layout (the packed CPU kernel) and
    # shares its compiled programs with any other sampler of this model in the process.
    sampler = Sampler(saved_model_config(start, self.model_config), params, start.tokenizer,
                      sharding=self.ctx if self.mesh.size > 1 else None)
    out = sampler.generate([p.tolist() for p in prompts], max_new_tokens=config.eval.sample_tokens,
                           sampling=SamplingParams(), stop_ids=start.template.stop_token_ids(start.tokenizer))
    return [{"prompt": start.tokenizer.decode(p.tolist()), "completion": c.text,
             "stopped": c.stop_reason == "stop_id"} for p, c in zip(prompts, out)]


def summary_line(step: int, metrics: dict[str, Any]) -> str:
  """One console line: `eval step 3: loss 2.3456, rewards/accuracies 0.600, ... (10 examples, 1.2s)`."""
  parts = [f"loss {metrics.get(EVAL_PREFIX + 'loss', math.nan):.4f}"]
  parts += [f"{k} {metrics[EVAL_PREFIX + k]:.4f}" for k in SUMMARY_KEYS if EVAL_PREFIX + k in metrics]
  if STOP_RATE_KEY in metrics:
    parts.append(f"stop rate {metrics[STOP_RATE_KEY]:.0%}")
  return (f"eval step {step}: {', '.join(parts)} ({metrics.get(EVAL_PREFIX + 'examples', 0)} examples, "
          f"{metrics.get(EVAL_PREFIX + 'runtime', 0.0):.1f}s)")
