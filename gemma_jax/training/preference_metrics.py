"""Metric helpers shared by the preference objectives (ORPO, SimPO): TRL's logits/* positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def trl_logit_mask(input_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """TRL's logits/* positions: every position t < T' - 1 of every row, T' = the longest row of the batch.

  TRL pads the concatenated batch to its longest row T' and averages `logits[:, :-1, :]` ([B, T' - 1, V]),
  padding positions included. Returns (mask [R, T] bool, T' - 1 as f32), so the metric is the same whatever
  length our batches are padded to.
  """
  r, t = input_mask.shape
  longest = jnp.max(jnp.sum(input_mask.astype(jnp.int32), axis=1))
  mask = jnp.broadcast_to(jnp.arange(t)[None, :] < longest - 1, (r, t))
  return mask, (longest - 1).astype(jnp.float32)
