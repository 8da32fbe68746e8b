"""Loading a checkpoint for sampling: the scripts' shared first step (default: the real Gemma 3 270M)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from absl import logging

from gemma_jax.errors import UserError
from gemma_jax.sampling.engine import Sampler


LOW_STOP_RATE = 0.5  # below this fraction of stopped eval samples, a fine-tune may not stop at end of turn


def stop_rate_warning(provenance: Mapping[str, Any]) -> str | None:
  """One line when training measured a low stop rate of its eval greedy samples (`provenance.trained`)."""
  trained = provenance.get("trained") or {}
  rate = trained.get("eval_stop_rate")
  if not isinstance(rate, (int, float)) or rate >= LOW_STOP_RATE:
    return None
  within = f" within {trained['eval_sample_tokens']} tokens" if trained.get("eval_sample_tokens") else ""
  return (f"this fine-tune stopped in only {rate:.0%} of its eval samples{within} (after {trained.get('steps')} "
          "steps); it may not stop at end of turn: train longer / check that <end_of_turn> is a target")


def load_sampler(ckpt: str | None, *, dtype: str | None = None, mesh: str | None = None,
                 prefill_chunk: int = 512, warn: Callable[[str], None] = logging.warning, base: str | None = None):
  """(Checkpoint, Sampler) for `ckpt` (our format); None = the real Gemma 3 270M (PT), converted once.

  An adapter (LoRA) checkpoint is sampled with its adapters unmerged, on its base (`base`: where that base is
  now, when it moved).

  mesh: a mesh spec such as "fsdp:-1" or "data:2,tensor:4" to shard params, batch and cache.
  warn: gets `stop_rate_warning`'s line, for a fine-tune that rarely stopped in its eval samples.
  """
  import jax
  from gemma_jax import checkpoint
  from gemma_jax.model.sharding import ShardingContext, make_mesh

  if ckpt is None:
    from gemma_jax.real_model import real_model_path
    ckpt = real_model_path()
    logging.info("no --ckpt: using the real Gemma 3 270M (PT) at %s", ckpt)
  ctx = ShardingContext(make_mesh(mesh)) if mesh else None
  ck = checkpoint.load(ckpt, sharding=ctx, dtype=dtype, base=base)
  if ck.tokenizer is None:
    raise UserError(f"{ckpt}: the checkpoint has no tokenizer.model; sampling needs one (re-convert it with "
                    "its tokenizer)")
  logging.info("loaded %s: %s (%s), kind=%s, template=%s, dtype=%s, %d devices (%s)", ckpt,
               ck.config.preset or ck.config.family, ck.config.family, ck.kind, ck.template,
               ck.config.param_dtype, jax.device_count(), jax.devices()[0].platform)
  msg = stop_rate_warning(ck.provenance)
  if msg:
    warn(msg)
  sampler = Sampler(ck.config, ck.params, ck.tokenizer, sharding=ctx, prefill_chunk=prefill_chunk)
  logging.info("matmuls: %s", "the packed CPU kernel (f32)" if sampler.packed else "XLA's")
  return ck, sampler
