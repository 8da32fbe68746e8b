"""The jitted sampling programs for one (config, sharding, weight layout): extend the cache by a prompt chunk,
prefill the last chunk and sample the first token, and the `lax.while_loop` decode over a `DecodeState`.

    decode(state, steps): while step < min(step + steps, max_new) and not every row stopped:
                            forward(last token) -> penalties -> strategy -> record -> stop ids

Letters: B batch, T prompt chunk, S cache slots, V vocab.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gemma_jax.model import kv_cache
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.sharding import ShardingContext
from gemma_jax.model.transformer import Transformer
from gemma_jax.sampling.strategies import Strategy, apply_penalties, filter_and_sample
from gemma_jax.sampling.weight_layout import WeightLayout

# Incremented while tracing (not while running): tests count compilations with it.
TRACE_COUNTS: collections.Counter = collections.Counter()


class DecodeState(NamedTuple):
  """Everything the decode loop carries. B rows, S cache slots (also the capacity of `tokens`)."""

  cache: kv_cache.Cache
  tokens: jax.Array  # [B, S] int32: sampled tokens, in order (column = step)
  last: jax.Array  # [B] int32: the latest sampled token, not yet fed to the model
  next_pos: jax.Array  # [B] int32: the position `last` takes when fed
  done: jax.Array  # [B] bool: the row has stopped (a stop id was sampled, or the host stopped it)
  num_tokens: jax.Array  # [B] int32: tokens sampled for the row, the stop id included
  step: jax.Array  # [] int32: columns of `tokens` filled
  max_new: jax.Array  # [] int32: stop after this many tokens
  key: jax.Array  # PRNG key
  logprobs: jax.Array  # [B, S] f32: log-prob of each sampled token under the model (before any strategy)
  seen: jax.Array  # [B, V] bool (prompt + output) when a penalty is on, else [B, 1]
  generated: jax.Array  # [B, V] bool (output only) when a penalty is on, else [B, 1]


def _token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log_softmax(logits)[b, tokens[b]] -> [B], without writing the [B, V] log-softmax (two reductions)."""
  return jnp.take_along_axis(logits, tokens[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, -1)


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
  return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


class Program:
  """The jitted functions for one (config, sharding, layout); shared by every Sampler of that model (see
  `program`), so a new Sampler (e.g. one per evaluation in a training run) does not compile again.

  Every function takes the params as `layout.store` left them.
  """

  def __init__(self, config: TransformerConfig, sharding: ShardingContext | None, layout: WeightLayout):
    self.config, self.sharding, self.layout = config, sharding, layout
    self.model = Transformer(config, sharding, matmul=layout.matmul)
    self.extend = jax.jit(self._extend_impl, donate_argnames=("cache",))
    self.prefill = jax.jit(self._prefill_impl, static_argnames=("strategy", "out_len"), donate_argnames=("cache",))
    self.decode = jax.jit(self._decode_impl, static_argnames=("strategy",), donate_argnames=("state",))

  def _constrain_cache(self, cache):
    if self.sharding is None:
      return cache
    axes = kv_cache.cache_axes(cache)
    return jax.tree.map(lambda a, x: jax.lax.with_sharding_constraint(x, self.sharding.sharding(a, x.shape)),
                        axes, cache, is_leaf=lambda a: isinstance(a, tuple))

  def _forward(self, params, tokens, positions, mask, cache):
    hidden, cache = self.model.apply({"params": params}, tokens, positions=positions, input_mask=mask,
                                     cache=cache, return_hidden=True)
    return hidden, self._constrain_cache(cache)

  def _extend_impl(self, params, tokens, positions, mask, cache):
    """Feeds a prompt chunk [B, T] into the cache (no logits)."""
    TRACE_COUNTS["extend"] += 1
    return self._forward(self.layout.model_view(params), tokens, positions, mask, cache)[1]

  def _prefill_impl(self, params, tokens, positions, mask, cache, key, values, stop_ids, max_new, *,
                    strategy: Strategy, out_len: int):
    """The last prompt chunk [B, T] (left-padded: each row's last token at T - 1) -> the first token + state."""
    TRACE_COUNTS["prefill"] += 1
    params = self.layout.model_view(params)
    hidden, cache = self._forward(params, tokens, positions, mask, cache)
    logits = self.layout.logits(hidden[:, -1], params, self.config)
    b, v = logits.shape
    if strategy.needs_seen:
      seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], jnp.where(mask, tokens, v)].set(True, mode="drop")
      generated = jnp.zeros((b, v), bool)
    else:
      seen = generated = jnp.zeros((b, 1), bool)
    key, sub = jax.random.split(key)
    first = filter_and_sample(apply_penalties(logits, strategy, values, seen, generated), sub, strategy, values)
    if strategy.needs_seen:
      seen = seen.at[jnp.arange(b), first].set(True)
      generated = generated.at[jnp.arange(b), first].set(True)
    lp = _token_logprob(logits, first)
    state = DecodeState(
        cache=cache, tokens=jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(first), last=first,
        next_pos=positions[:, -1] + 1, done=_is_stop(first, stop_ids), num_tokens=jnp.ones((b,), jnp.int32),
        step=jnp.ones((), jnp.int32), max_new=max_new, key=key, seen=seen, generated=generated,
        logprobs=jnp.zeros((b, out_len), jnp.float32).at[:, 0].set(lp))
    return state

  def _decode_impl(self, params, state: DecodeState, num_steps, values, stop_ids, *, strategy: Strategy):
    """Runs up to `num_steps` decode steps (fewer when max_new is reached or every row has stopped)."""
    TRACE_COUNTS["decode"] += 1
    end = jnp.minimum(state.step + num_steps, state.max_new)
    b = state.last.shape[0]

    def cond(carry):
      st = carry[0]
      return (st.step < end) & ~jnp.all(st.done)

    def body(carry):
      st, params = carry[0], self.layout.loop_view(carry[1])
      hidden, cache = self._forward(params, st.last[:, None], st.next_pos[:, None], ~st.done[:, None], st.cache)
      logits = self.layout.logits(hidden[:, 0], params, self.config)
      key, sub = jax.random.split(st.key)
      tok = filter_and_sample(apply_penalties(logits, strategy, values, st.seen, st.generated), sub, strategy,
                              values)
      tok = jnp.where(st.done, 0, tok)
      seen, generated = st.seen, st.generated
      if strategy.needs_seen:
        rows = jnp.arange(b)
        idx = jnp.where(st.done, seen.shape[1], tok)
        seen = seen.at[rows, idx].set(True, mode="drop")
        generated = generated.at[rows, idx].set(True, mode="drop")
      live = ~st.done
      lp = _token_logprob(logits, tok)[:, None]
      return DecodeState(
          cache=cache, tokens=jax.lax.dynamic_update_slice(st.tokens, tok[:, None], (0, st.step)),
          last=jnp.where(live, tok, st.last), next_pos=st.next_pos + live, done=st.done | _is_stop(tok, stop_ids),
          num_tokens=st.num_tokens + live, step=st.step + 1, max_new=st.max_new, key=key, seen=seen,
          generated=generated, logprobs=jax.lax.dynamic_update_slice(st.logprobs, lp, (0, st.step))), carry[1]

    return jax.lax.while_loop(cond, body, (state, self.layout.loop_carry(params)))[0]


@functools.lru_cache(maxsize=8)
def program(config: TransformerConfig, sharding: ShardingContext | None, layout: WeightLayout) -> Program:
  """The (cached) `Program` for this model and layout."""
  return Program(config, sharding, layout)
