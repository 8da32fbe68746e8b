"""Loading a checkpoint for sampling: the scripts' shared first step (default: the real Gemma 3 270M)."""

from __future__ import annotations

from absl import logging

from gemma_jax.errors import UserError
from gemma_jax.sampling.engine import Sampler


def load_sampler(ckpt: str | None, *, dtype: str | None = None, mesh: str | None = None,
                 prefill_chunk: int = 512):
  """(Checkpoint, Sampler) for `ckpt` (our format); None = the real Gemma 3 270M (PT), converted once.

  mesh: a mesh spec such as "fsdp:-1" or "data:2,tensor:4" to shard params, batch and cache.
  """
  import jax
  from gemma_jax import checkpoint
  from gemma_jax.model.sharding import ShardingContext, make_mesh

  if ckpt is None:
    from gemma_jax.real_model import real_model_path
    ckpt = real_model_path()
    logging.info("no --ckpt: using the real Gemma 3 270M (PT) at %s", ckpt)
  ctx = ShardingContext(make_mesh(mesh)) if mesh else None
  ck = checkpoint.load(ckpt, sharding=ctx, dtype=dtype)
  if ck.tokenizer is None:
    raise UserError(f"{ckpt}: the checkpoint has no tokenizer.model; sampling needs one (re-convert it with "
                    "its tokenizer)")
  logging.info("loaded %s: %s (%s), kind=%s, template=%s, dtype=%s, %d devices (%s)", ckpt,
               ck.config.preset or ck.config.family, ck.config.family, ck.kind, ck.template,
               ck.config.param_dtype, jax.device_count(), jax.devices()[0].platform)
  sampler = Sampler(ck.config, ck.params, ck.tokenizer, sharding=ctx, prefill_chunk=prefill_chunk)
  logging.info("matmuls: %s", "the packed CPU kernel (f32)" if sampler.packed else "XLA's")
  return ck, sampler
