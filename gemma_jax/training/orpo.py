"""ORPO (Hong, Lee, Thorne 2024), computed exactly as TRL's `ORPOTrainer` computes it.

    a_w, a_l   = length-averaged log-prob of the chosen / rejected RESPONSE tokens (target_mask)
    log_odds   = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))            (f32, TRL's stable log1mexp)
    loss       = nll_loss - lambda * mean(logsigmoid(log_odds))
    nll_loss   = token-mean cross-entropy over the chosen rows' nll_mask (TRL: prompt + response, BOS excluded)

One forward pass over the 2B rows [chosen; rejected]; log-probs are chunked (`logprobs.token_logprobs`).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from gemma_jax.training.logprobs import (DEFAULT_CHUNK_BYTES, DEFAULT_SAVED_BYTES, masked_sums, model_logprobs,
                                         reward_metrics, split_pairs)
from gemma_jax.training.preference_metrics import trl_logit_mask

LN2 = 0.6931471805599453
MAX_AVG_LOGP = -1e-7  # a = 0 exactly would make log1mexp(a) = -inf; TRL 1.16 does not clamp (it returns inf/NaN)


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, stable in f32: log1p(-exp(x)) below -ln 2, log(-expm1(x)) above (TRL's form)."""
  x = x.astype(jnp.float32)
  return jnp.where(x < -LN2, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def odds_ratio(chosen_logps: jax.Array, rejected_logps: jax.Array) -> jax.Array:
  """log_odds [B] from the average response log-probs a_w, a_l [B] (clamped to <= -1e-7 first)."""
  a_w = jnp.minimum(chosen_logps.astype(jnp.float32), MAX_AVG_LOGP)
  a_l = jnp.minimum(rejected_logps.astype(jnp.float32), MAX_AVG_LOGP)
  return (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))


def orpo_loss(params, batch: dict[str, jax.Array], *, model, config=None, beta: float = 0.1,
              nll_target: Literal["sequence", "response"] = "sequence", max_targets: int | None = None,
              chunk_size: int | None = None,
              max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, save_logits: bool | None = None,
              max_saved_bytes: int = DEFAULT_SAVED_BYTES
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ORPO loss and TRL's metrics for one preference batch.

  Args:
    params: the policy's params; model: a `Transformer`; config: its config (default `model.config`).
    batch: R = 2B rows, chosen then rejected, right-padded: tokens [R, T] int32, input_mask [R, T] bool,
      target_mask [R, T] bool (response targets; token t is predicted by the logits at t - 1), and nll_mask
      [R, T] (tokens of the NLL term; default: every non-pad token of the chosen rows but the first).
    beta: lambda, the weight of the odds-ratio term (TRL's `beta`, default 0.1).
    nll_target: "sequence" (TRL and the official code: prompt + response, i.e. `nll_mask`) or "response"
      (LLaMA-Factory: the chosen rows' target_mask).
    max_targets: a bound on the tokens each row's loss terms read (see `logprobs.token_logprobs`): the
      response tokens, and with nll_target="sequence" every chosen token. None: the head on every position.
    chunk_size, max_chunk_bytes, save_logits, max_saved_bytes: see `logprobs.token_logprobs`.

  Returns (loss, metrics) with TRL's metric names, each a scalar:
    rewards/chosen, rewards/rejected: mean of beta * a_w, beta * a_l; rewards/accuracies: mean(beta a_w >
    beta a_l) (strict); rewards/margins; logps/chosen, logps/rejected: mean of a_w, a_l; nll_loss;
    log_odds_ratio: mean(logsigmoid(log_odds)); log_odds_chosen: mean(log_odds);
    logits/chosen, logits/rejected: TRL's quirk, reproduced: the mean of the raw (soft-capped) logits over
    EVERY position of the padded rows, [B, T' - 1, V] with T' the longest row of the batch, padding positions
    and prompt included (not a mean over response tokens). Padding logits are computed as HF does (pad tokens
    at positions continuing arange(T), attending to the real tokens before them), so the metric equals TRL's
    when the pad id is the tokenizer's pad id and the batch is padded to its longest row (TRL's layout); with
    longer padding, a padding position more than a sliding window past its row's end sees no key and (as in
    HF) attends uniformly over every slot, so the metric drifts slightly. Loss and gradients never depend on
    padding.
  """
  mask = jnp.asarray(batch["input_mask"]).astype(bool)
  r = mask.shape[0]
  b = r // 2
  logit_mask, positions = trl_logit_mask(mask)
  if nll_target == "sequence":
    nll_mask = batch.get("nll_mask")
    if nll_mask is None:
      nll_mask = mask.at[:, 0].set(False) & (jnp.arange(r) < b)[:, None]
  elif nll_target == "response":
    nll_mask = batch["target_mask"].astype(bool) & (jnp.arange(r) < b)[:, None]
  else:
    raise ValueError(f"nll_target must be 'sequence' or 'response', got {nll_target!r}")
  target_mask = batch["target_mask"].astype(bool)
  out = model_logprobs(params, batch, model=model, config=config, logit_sum_mask=logit_mask,
                       targets=target_mask | nll_mask, max_targets=max_targets, chunk_size=chunk_size,
                       max_chunk_bytes=max_chunk_bytes, save_logits=save_logits, max_saved_bytes=max_saved_bytes)
  lp = out.logprobs

  sums, counts = masked_sums(lp, target_mask)
  avg = sums / jnp.maximum(counts, 1.0)
  chosen, rejected = split_pairs(avg)

  nll_sum, nll_count = masked_sums(lp, nll_mask)
  nll = -jnp.sum(nll_sum) / jnp.maximum(jnp.sum(nll_count), 1.0)

  log_odds = odds_ratio(chosen, rejected)
  ratio = jax.nn.log_sigmoid(log_odds)
  loss = nll - beta * jnp.mean(ratio)

  sg = jax.lax.stop_gradient
  chosen_rewards, rejected_rewards = beta * sg(chosen), beta * sg(rejected)
  vocab = params["embedder"]["input_embedding"].shape[0]
  logit_chosen, logit_rejected = split_pairs(out.logit_sums)
  denom = b * positions * vocab
  metrics = {
      **reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected),
      "logits/chosen": jnp.sum(logit_chosen) / denom,
      "logits/rejected": jnp.sum(logit_rejected) / denom,
      "nll_loss": sg(nll),
      "log_odds_ratio": jnp.mean(sg(ratio)),
      "log_odds_chosen": jnp.mean(sg(log_odds)),
  }
  return loss, metrics
