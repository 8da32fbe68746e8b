"""SimPO (Meng, Xia, Chen 2024): length-normalized rewards with a target margin, no reference model.

    a_w, a_l  = AVERAGE response-token log-probs of the chosen / rejected rows (target_mask)
    loss      = mean(-logsigmoid(beta * (a_w - a_l) - gamma))

As TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0: its `simpo_gamma` is this gamma (absolute; the paper
quotes gamma / beta, e.g. beta 10 and gamma / beta 0.5 for gemma-2-9b-it, i.e. gamma = 5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_jax.training.logprobs import (DEFAULT_CHUNK_BYTES, DEFAULT_SAVED_BYTES, masked_sums, model_logprobs,
                                         reward_metrics, split_pairs)
from gemma_jax.training.preference_metrics import trl_logit_mask


def simpo_losses(chosen_avg_logps, rejected_avg_logps, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> jax.Array:
  """Per-pair SimPO losses [B] from average response log-probs [B]."""
  z = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def simpo_loss(params, batch: dict[str, jax.Array], *, model, config=None, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0, max_targets: int | None = None, chunk_size: int | None = None,
               max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, save_logits: bool | None = None,
               max_saved_bytes: int = DEFAULT_SAVED_BYTES
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SimPO loss and metrics (TRL CPOTrainer names) for one preference batch.

  batch: R = 2B rows (chosen then rejected): tokens, input_mask, target_mask [R, T].
  max_targets: a bound on the response tokens per row: the head runs on those positions only
    (`logprobs.token_logprobs`); None: on every position.
  Metrics: rewards/{chosen,rejected,accuracies,margins} (rewards = beta * a), logps/chosen, logps/rejected
  (means of a_w, a_l), logits/chosen, logits/rejected (TRL's all-positions mean, see `orpo.orpo_loss`).
  """
  mask = jnp.asarray(batch["input_mask"]).astype(bool)
  logit_mask, positions = trl_logit_mask(mask)
  targets = batch["target_mask"].astype(bool) & mask
  out = model_logprobs(params, batch, model=model, config=config, logit_sum_mask=logit_mask, targets=targets,
                       max_targets=max_targets, chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes,
                       save_logits=save_logits, max_saved_bytes=max_saved_bytes)
  sums, counts = masked_sums(out.logprobs, targets)
  chosen, rejected = split_pairs(sums / jnp.maximum(counts, 1.0))
  losses = simpo_losses(chosen, rejected, beta, gamma, label_smoothing)
  chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
  b = chosen.shape[0]
  vocab = params["embedder"]["input_embedding"].shape[0]
  logit_chosen, logit_rejected = split_pairs(out.logit_sums)
  metrics = {
      **reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected),
      "logits/chosen": jnp.sum(logit_chosen) / (b * positions * vocab),
      "logits/rejected": jnp.sum(logit_rejected) / (b * positions * vocab),
  }
  return jnp.mean(losses), metrics
