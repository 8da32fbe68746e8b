"""DPO (Rafailov et al. 2023), sigmoid loss, as TRL's `DPOTrainer` defines it.

    s         = SUM of the response-token log-probs of a row (target_mask)
    loss      = mean(-logsigmoid(beta * ((s_w - ref_w) - (s_l - ref_l))))      (beta applied once)

The reference log-probs come either precomputed, in `batch["reference_logps"]` [R] (one pass over the data
with `reference_logps`, e.g. before training), or from frozen reference params (`reference_params=`), in which
case they are computed in the same step under stop_gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_jax.errors import ConfigError
from gemma_jax.training.logprobs import (DEFAULT_CHUNK_BYTES, DEFAULT_SAVED_BYTES, masked_sums, model_logprobs,
                                         reward_metrics, split_pairs)


def response_logps(logprobs: jax.Array, target_mask: jax.Array) -> jax.Array:
  """[R]: the sum of the response-token log-probs of each row."""
  return masked_sums(logprobs, target_mask)[0]


def reference_logps(params, batch: dict[str, jax.Array], *, model, config=None, max_targets: int | None = None,
                    chunk_size: int | None = None, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> jax.Array:
  """[R]: the reference model's summed response log-probs for a preference batch (no gradient).

  Jit it and map it over the dataset once to store `reference_logps` with each batch, or let `dpo_loss` call
  it with frozen `reference_params`.
  """
  mask = jnp.asarray(batch["input_mask"]).astype(bool)
  targets = batch["target_mask"].astype(bool) & mask
  out = model_logprobs(params, batch, model=model, config=config, logit_sum_mask=jnp.zeros(mask.shape, bool),
                       targets=targets, max_targets=max_targets, chunk_size=chunk_size,
                       max_chunk_bytes=max_chunk_bytes)
  return jax.lax.stop_gradient(response_logps(out.logprobs, targets))


def sigmoid_dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
                label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair DPO losses [B] and the implicit rewards (beta * (s_w - ref_w), beta * (s_l - ref_l)) [B].

  With label_smoothing e (conservative DPO): -(1 - e) logsigmoid(beta z) - e logsigmoid(-beta z).
  """
  chosen_ratio = chosen_logps - ref_chosen_logps
  rejected_ratio = rejected_logps - ref_rejected_logps
  z = chosen_ratio - rejected_ratio
  losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z) - label_smoothing * jax.nn.log_sigmoid(-beta * z)
  sg = jax.lax.stop_gradient
  return losses, beta * sg(chosen_ratio), beta * sg(rejected_ratio)


def dpo_loss(params, batch: dict[str, jax.Array], *, model, config=None, beta: float = 0.1,
             reference_params=None, label_smoothing: float = 0.0, max_targets: int | None = None,
             chunk_size: int | None = None,
             max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, save_logits: bool | None = None,
             max_saved_bytes: int = DEFAULT_SAVED_BYTES
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO loss and TRL's DPO metrics for one preference batch.

  batch: R = 2B rows (chosen then rejected): tokens, input_mask, target_mask [R, T]; and reference_logps [R]
    unless `reference_params` is given.
  max_targets: a bound on the response tokens per row: the head (policy and reference) runs on those
    positions only (`logprobs.token_logprobs`); None: on every position.
  Metrics: rewards/{chosen,rejected,accuracies,margins}; logps/chosen, logps/rejected (means of the summed
  response log-probs); logits/chosen, logits/rejected (as TRL's DPOTrainer: the vocabulary-mean logit at each
  position predicting a response token, averaged over those positions).
  """
  mask = jnp.asarray(batch["input_mask"]).astype(bool)
  targets = batch["target_mask"].astype(bool) & mask
  predicting = jnp.concatenate([targets[:, 1:], jnp.zeros_like(targets[:, :1])], axis=1)  # logits at t - 1
  out = model_logprobs(params, batch, model=model, config=config, logit_sum_mask=predicting, targets=targets,
                       max_targets=max_targets, chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes,
                       save_logits=save_logits, max_saved_bytes=max_saved_bytes)
  logps = response_logps(out.logprobs, targets)
  if reference_params is not None:
    ref = reference_logps(reference_params, batch, model=model, config=config, max_targets=max_targets,
                          chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes)
  elif "reference_logps" in batch:
    ref = jax.lax.stop_gradient(batch["reference_logps"].astype(jnp.float32))
  else:
    raise ConfigError("DPO needs reference log-probs: pass reference_params, or precompute batch['reference_logps'] "
                      "with gemma_jax.training.dpo.reference_logps")
  chosen, rejected = split_pairs(logps)
  ref_chosen, ref_rejected = split_pairs(ref)
  losses, chosen_rewards, rejected_rewards = sigmoid_dpo(chosen, rejected, ref_chosen, ref_rejected, beta,
                                                         label_smoothing)
  vocab = params["embedder"]["input_embedding"].shape[0]
  sum_chosen, sum_rejected = split_pairs(out.logit_sums)
  n_chosen, n_rejected = split_pairs(jnp.sum(targets, axis=1).astype(jnp.float32))
  metrics = {
      **reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected),
      "logits/chosen": jnp.sum(sum_chosen) / (vocab * jnp.maximum(jnp.sum(n_chosen), 1.0)),
      "logits/rejected": jnp.sum(sum_rejected) / (vocab * jnp.maximum(jnp.sum(n_rejected), 1.0)),
  }
  return jnp.mean(losses), metrics
