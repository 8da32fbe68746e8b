"""Supervised fine-tuning: the token-mean negative log-likelihood of the target tokens.

    loss = -sum(logp * target_mask) / sum(target_mask)

Packed rows (several examples per row) carry segment_ids and positions: attention stays within a segment,
positions restart per segment, and the data pipeline leaves each segment's first token out of target_mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_jax.training.logprobs import DEFAULT_CHUNK_BYTES, DEFAULT_SAVED_BYTES, masked_sums, model_logprobs


def sft_loss(params, batch: dict[str, jax.Array], *, model, config=None, max_targets: int | None = None,
             chunk_size: int | None = None,
             max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, save_logits: bool | None = None,
             max_saved_bytes: int = DEFAULT_SAVED_BYTES
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Target-masked token-mean NLL for one batch.

  batch: tokens [R, T] int32, input_mask [R, T] bool, target_mask [R, T] bool (token t is predicted by the
    logits at t - 1; target_mask[:, 0] is False); optional segment_ids and positions [R, T] for packed rows.
  max_targets: a bound on the target tokens per row: the head runs on those positions only
    (`logprobs.token_logprobs`); None: on every position.
  Returns (loss, {"nll_loss", "target_tokens"}).
  """
  mask = jnp.asarray(batch["input_mask"]).astype(bool)
  targets = batch["target_mask"].astype(bool) & mask
  out = model_logprobs(params, batch, model=model, config=config, logit_sum_mask=jnp.zeros(mask.shape, bool),
                       targets=targets, max_targets=max_targets, chunk_size=chunk_size,
                       max_chunk_bytes=max_chunk_bytes, save_logits=save_logits, max_saved_bytes=max_saved_bytes)
  sums, counts = masked_sums(out.logprobs, targets)
  tokens = jnp.sum(counts)
  loss = -jnp.sum(sums) / jnp.maximum(tokens, 1.0)
  return loss, {"nll_loss": jax.lax.stop_gradient(loss), "target_tokens": tokens}
