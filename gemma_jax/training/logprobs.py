"""Per-token log-probs of the next token from the final hidden states, chunked over the sequence.

    hidden [R, T, D] --(tied head, soft-cap, chunk of C positions at a time)--> log p(tokens[:, t] | tokens[:, :t])

Unless they are small, the full f32 logits [R, T, V] are never materialized: a `lax.scan` walks over chunks
of C positions and keeps only [R, C, V] alive; the backward pass (a custom VJP) walks the chunks again,
recomputing each chunk's logits from the saved hidden states, and accumulates the embedding gradient [V, D] in
its carry. Peak memory is set by the chunk, not by T or V (tests/test_training_logprobs.py checks the
compiled memory analysis). When all the logits fit `max_saved_bytes` (small batches, CPU runs), one chunk is
computed and kept for the backward pass instead: one head matmul fewer and large GEMMs (about twice as fast
for ORPO on the real 270M on CPU; docs/DESIGN.md).

Chunks run along the sequence axis so every chunk keeps the batch axis (R) and the vocabulary axis (V) whole:
under a mesh, the batch stays sharded over data/fsdp and the vocabulary over tensor, and XLA's SPMD partitioner
reduces the log-sum-exp across vocabulary shards.

Letters: R rows (2B for preference batches), T positions, D model, V vocabulary, C positions per chunk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.layers import tied_logits
from gemma_jax.model.transformer import logits_from_hidden

# Default chunk budget: C is chosen so that one chunk of f32 logits [R, C, V] is about this many bytes.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
# Default budget for keeping every position's f32 logits [R, T - 1, V] alive between the forward and backward
# passes (`save_logits=None`): above it the logits are recomputed chunk by chunk in the backward pass.
DEFAULT_SAVED_BYTES = 1536 * 1024 * 1024


class LogProbs(NamedTuple):
  """logprobs [R, T] f32: log p(tokens[:, t] | tokens[:, :t]) under the logits at t - 1; 0 at t = 0.

  logit_sums [R] f32: sum over the positions in `logit_sum_mask` and over the vocabulary of the (soft-capped)
  logits. For metrics only: it carries no gradient.
  """

  logprobs: jax.Array
  logit_sums: jax.Array


def chunk_positions(rows: int, vocab: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
  """C: positions per chunk so that one f32 chunk of logits [rows, C, vocab] fits `max_chunk_bytes`."""
  return max(1, max_chunk_bytes // max(1, rows * vocab * 4))


def token_logprobs(hidden: jax.Array, embedding: jax.Array, tokens: jax.Array, config: TransformerConfig, *,
                   logit_sum_mask: jax.Array | None = None, targets: jax.Array | None = None,
                   max_targets: int | None = None, chunk_size: int | None = None,
                   max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, save_logits: bool | None = None,
                   max_saved_bytes: int = DEFAULT_SAVED_BYTES) -> LogProbs:
  """Log-probs of each next token, chunked; the gradient flows to `hidden` and `embedding`.

  Args:
    hidden: [R, T, D] final-normed hidden states (`Transformer.apply(..., return_hidden=True)`).
    embedding: [V, D] the tied embedding table (`params["embedder"]["input_embedding"]`).
    tokens: [R, T] int: the inputs; tokens[:, t] is the target of the logits at t - 1.
    config: the model config (its `final_logit_soft_cap` applies).
    logit_sum_mask: [R, T] bool or float: which positions' logits (the logits computed AT position t, i.e.
      predicting t + 1) enter `logit_sums`. Default: every position but the last (TRL's `logits[:, :-1]`).
    targets: [R, T] bool: the tokens whose log-probs the caller reads (a loss's target tokens). Only with
      `max_targets`.
    max_targets: K, a bound on `targets` per row (static). The head then runs on the K positions predicting
      them, [R, K] instead of [R, T - 1] (for Gemma's 262k vocabulary the head is most of a small model's
      step); every other log-prob is 0. A row with more than K targets makes every log-prob NaN, never a
      silently wrong loss. None (or K >= T - 1): every position.
    chunk_size: C, positions per chunk; default: every position in one chunk when the logits are saved,
      else from `max_chunk_bytes`.
    save_logits: keep every chunk's logits for the backward pass instead of recomputing the logits there
      (one head matmul fewer per step, but [R, T, V] f32 memory again). None: only when those logits take at
      most `max_saved_bytes` (sized on the global shapes; under a mesh each device holds its shard).
  Returns: LogProbs(logprobs [R, T], logit_sums [R]).
  """
  r, t, d = hidden.shape
  if logit_sum_mask is None:
    logit_sum_mask = jnp.ones((r, t), bool).at[:, -1].set(False)
  head = functools.partial(_head, embedding=embedding, cap=config.final_logit_soft_cap, chunk_size=chunk_size,
                           max_chunk_bytes=max_chunk_bytes, save_logits=save_logits, max_saved_bytes=max_saved_bytes)
  tokens = tokens.astype(jnp.int32)
  zero = jnp.zeros((r, 1), jnp.float32)
  if targets is not None and max_targets is not None and max_targets < t - 1:
    want = jnp.asarray(targets)[:, 1:].astype(bool)  # [R, T - 1]: token t + 1 is read <-> the logits at t
    order = jnp.argsort(jnp.logical_not(want), axis=1, stable=True)[:, :max_targets]  # [R, K] those t first
    picked = jnp.take_along_axis(want, order, axis=1)
    lp_k, _ = head(jnp.take_along_axis(hidden[:, :-1], order[..., None], axis=1),
                   jnp.take_along_axis(tokens[:, 1:], order, axis=1), jnp.zeros(order.shape, jnp.float32))
    lp = jnp.zeros(want.shape, jnp.float32).at[jnp.arange(r)[:, None], order].set(jnp.where(picked, lp_k, 0.0))
    lp = jnp.where(jnp.any(jnp.sum(want, axis=1) > max_targets), jnp.nan, lp)
    return LogProbs(jnp.concatenate([zero, lp], axis=1), _logit_sums(hidden, embedding, config, logit_sum_mask, head))
  lp, sums = head(hidden[:, :-1], tokens[:, 1:], logit_sum_mask[:, :-1].astype(jnp.float32))
  return LogProbs(jnp.concatenate([zero, lp], axis=1), jax.lax.stop_gradient(sums + _last_sums(
      hidden, embedding, config, logit_sum_mask)))


def _last_sums(hidden, embedding, config, logit_sum_mask) -> jax.Array:
  """[R]: the vocabulary sums of the logits at the last position, where the mask has it (never in TRL's layout):
  they predict nothing, so the chunked head leaves them out."""
  return jnp.where(logit_sum_mask[:, -1], jnp.sum(logits_from_hidden(hidden[:, -1], embedding, config), -1), 0.0)


def _logit_sums(hidden, embedding, config, logit_sum_mask, head) -> jax.Array:
  """[R] `logit_sums` for the target-positions head, which computes no other logits (no gradient).

  Uncapped: each position's vocabulary sum of the logits is h . sum_v E[v] (linear), a [D] vector, so no head
  is needed. Soft-capped: a forward-only pass of the chunked head over every position.
  """
  hidden, embedding = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(embedding)
  mask = logit_sum_mask.astype(jnp.float32)
  if config.final_logit_soft_cap is None:
    column_sums = jnp.sum(embedding.astype(hidden.dtype).astype(jnp.float32), axis=0)
    per_position = jnp.einsum("rtd,d->rt", hidden.astype(jnp.float32), column_sums,
                              precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(per_position * mask, axis=1)
  _, sums = head(hidden[:, :-1], jnp.zeros(hidden.shape[:2], jnp.int32)[:, 1:], mask[:, :-1])
  return sums + _last_sums(hidden, embedding, config, logit_sum_mask)


def _head(h: jax.Array, y: jax.Array, m: jax.Array, *, embedding: jax.Array, cap: float | None,
          chunk_size: int | None, max_chunk_bytes: int, save_logits: bool | None,
          max_saved_bytes: int) -> tuple[jax.Array, jax.Array]:
  """The chunked head over N positions: h [R, N, D], y [R, N] int32 (the next tokens), m [R, N] f32 (the
  logit-sum mask) -> (log p(y) [R, N], masked vocabulary sums of the logits [R])."""
  r, n, _ = h.shape
  if save_logits is None:
    save_logits = r * n * embedding.shape[0] * 4 <= max_saved_bytes
  c = chunk_size or (n if save_logits else chunk_positions(r, embedding.shape[0], max_chunk_bytes))
  c = max(1, min(c, n))
  chunks = -(-n // c)
  pad = chunks * c - n

  def split(x):  # [R, N, ...] -> [chunks, R, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((r, chunks, c) + x.shape[2:]), 1, 0)

  lp, sums = _chunked_logprobs(cap, save_logits, split(h), split(y), split(m), embedding)
  return jnp.moveaxis(lp, 0, 1).reshape(r, chunks * c)[:, :n], sums


def naive_token_logprobs(hidden: jax.Array, embedding: jax.Array, tokens: jax.Array, config: TransformerConfig, *,
                         logit_sum_mask: jax.Array | None = None) -> LogProbs:
  """The same as `token_logprobs` through the full f32 logits [R, T, V]: the reference for tests."""
  r, t, _ = hidden.shape
  if logit_sum_mask is None:
    logit_sum_mask = jnp.ones((r, t), bool).at[:, -1].set(False)
  logits = logits_from_hidden(hidden, embedding, config)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  lp = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  lp = jnp.concatenate([jnp.zeros((r, 1), lp.dtype), lp], axis=1)
  sums = jnp.sum(jnp.sum(logits, -1) * logit_sum_mask, -1)
  return LogProbs(lp, jax.lax.stop_gradient(sums))


# ---------------------------------------------------------------------------------------------------------
# The chunked kernel: forward and backward scans with a custom VJP.

def _forward(cap, save_logits, h, y, m, e):
  r = h.shape[1]

  def body(sums, xs):
    hc, yc, mc = xs
    logits = tied_logits(hc, e, cap)  # [R, C, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
    sums = sums + jnp.sum(jnp.sum(logits, -1) * mc, -1)
    return sums, (target - lse, lse, logits if save_logits else None)

  sums, (lp, lse, saved) = jax.lax.scan(body, jnp.zeros((r,), jnp.float32), (h, y, m))
  return lp, sums, lse, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_logprobs(cap, save_logits, h, y, m, e):
  """h [n, R, C, D], y [n, R, C] int32, m [n, R, C] f32, e [V, D] -> (logprobs [n, R, C], logit sums [R])."""
  lp, sums, _, _ = _forward(cap, save_logits, h, y, m, e)
  return lp, sums


def _chunked_fwd(cap, save_logits, h, y, m, e):
  lp, sums, lse, saved = _forward(cap, save_logits, h, y, m, e)
  return (lp, sums), (h, y, lse, saved, e)


def _chunked_bwd(cap, save_logits, res, cts):
  h, y, lse, saved, e = res
  g, _ = cts  # the logit sums are metrics: their cotangent is dropped (they are stop_gradient'ed above)
  _, r, c, d = h.shape
  vocab = e.shape[0]

  def body(de_t, xs):
    hc, yc, lsec, gc, saved_logits = xs
    logits = saved_logits if save_logits else tied_logits(hc, e, cap)
    p = jnp.exp(logits - lsec[..., None])
    onehot = yc[..., None] == jax.lax.broadcasted_iota(jnp.int32, p.shape, 2)
    dlogits = gc[..., None] * (onehot.astype(jnp.float32) - p)  # d logp / d capped logits
    if cap is not None:
      dlogits = dlogits * (1.0 - jnp.square(logits / cap))  # d(cap tanh(z / cap)) / dz
    # Flat [N, V] / [N, D] operands so both products are plain GEMMs; the embedding gradient accumulates
    # transposed ([D, V]: h^T @ dlogits needs no copy of the [N, V] operand) and is transposed once at the end.
    dlogits = dlogits.astype(hc.dtype).reshape(r * c, vocab)
    h2 = hc.reshape(r * c, d)
    dh = jnp.dot(dlogits, e.astype(hc.dtype), preferred_element_type=jnp.float32)
    de_t = de_t + jnp.dot(h2.T, dlogits, preferred_element_type=jnp.float32)
    return de_t, dh.reshape(r, c, d).astype(hc.dtype)

  de0 = jnp.zeros((d, vocab), jnp.float32)
  de_t, dh = jax.lax.scan(body, de0, (h, y, lse, g, saved))
  return dh, None, None, de_t.T.astype(e.dtype)


_chunked_logprobs.defvjp(_chunked_fwd, _chunked_bwd)


# ---------------------------------------------------------------------------------------------------------
# From a batch and the model's params.

def fill_positions(input_mask: jax.Array) -> jax.Array:
  """[R, T] positions: counted over the real tokens, and continued through the padding after them.

  Real tokens get the positions they would have alone; the right padding after a row gets the next positions
  (as HF, which numbers every slot `arange(T)`), so the padding logits (which only TRL's logits/* metrics read)
  match the HF reference. Leading padding gets 0.
  """
  t = input_mask.shape[1]
  counted = jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1
  first = jnp.argmax(input_mask, axis=1).astype(jnp.int32)
  continued = jnp.arange(t, dtype=jnp.int32)[None, :] - first[:, None]
  return jnp.maximum(jnp.where(input_mask, counted, continued), 0)


def model_logprobs(params, batch: dict[str, jax.Array], *, model, config: TransformerConfig | None = None,
                   logit_sum_mask: jax.Array | None = None, targets: jax.Array | None = None,
                   max_targets: int | None = None, chunk_size: int | None = None,
                   max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, save_logits: bool | None = None,
                   max_saved_bytes: int = DEFAULT_SAVED_BYTES) -> LogProbs:
  """Runs `model` (a `Transformer`) on `batch` and returns the chunked `LogProbs` of its tokens.

  batch: tokens [R, T] int32, input_mask [R, T] bool; optional positions, segment_ids [R, T] (packing).
  targets, max_targets: see `token_logprobs` (the head on the target positions only).
  """
  config = config or model.config
  tokens, mask = batch["tokens"], jnp.asarray(batch["input_mask"]).astype(bool)
  positions = batch.get("positions")
  if positions is None:
    positions = fill_positions(mask)
  hidden, _ = model.apply({"params": params}, tokens, positions=positions, input_mask=mask,
                          segment_ids=batch.get("segment_ids"), return_hidden=True)
  return token_logprobs(hidden, params["embedder"]["input_embedding"], tokens, config,
                        logit_sum_mask=logit_sum_mask, targets=targets, max_targets=max_targets,
                        chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes,
                        save_logits=save_logits, max_saved_bytes=max_saved_bytes)


def masked_sums(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of logprobs [R] over `mask` [R, T], count [R] f32)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(logprobs * mask, axis=1), jnp.sum(mask, axis=1)


def split_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[2B, ...] rows (chosen first, then rejected) -> (chosen [B, ...], rejected [B, ...])."""
  b = x.shape[0] // 2
  return x[:b], x[b:]


def reward_metrics(chosen_rewards: jax.Array, rejected_rewards: jax.Array, chosen_logps: jax.Array,
                   rejected_logps: jax.Array) -> dict[str, jax.Array]:
  """TRL's rewards/* and logps/* metrics from per-pair rewards and log-probs [B] (no gradient flows)."""
  sg = jax.lax.stop_gradient
  chosen_rewards, rejected_rewards = sg(chosen_rewards), sg(rejected_rewards)
  return {
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "logps/chosen": jnp.mean(sg(chosen_logps)),
      "logps/rejected": jnp.mean(sg(rejected_logps)),
  }
