"""Sampling strategies: one frozen params object, split into a static part (what code runs) and dynamic values.

    logits [B, V] -> repetition / presence penalties -> / temperature -> top-k -> top-p -> min-p -> sample

`SamplingParams(temperature=0)` is greedy (argmax; penalties still apply). The order of the filters follows
HF transformers. The static part (`Strategy`) picks the compiled code: greedy or not, the top-k size, which
filters are on; the dynamic part (`StrategyValues`) carries the numbers as arrays, so changing a temperature
or a top-p does not recompile.

Penalties:
  repetition_penalty r (CTRL / HF): a token seen in the prompt or the output has its logit divided by r when
    positive, multiplied by r when negative (r > 1 discourages repeats).
  presence_penalty a (OpenAI / vLLM): a token already generated has `a` subtracted from its logit once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gemma_jax.errors import UserError

NEG_INF = -1e30  # finite: a row whose every candidate is filtered still samples (its best token)


class SamplingOptionError(UserError):
  """A bad `SamplingParams` value; `field` names it, so that a script can name its flag instead."""

  def __init__(self, field: str, value, why: str):
    super().__init__(f"sampling option {field}={value!r}: {why}")
    self.field, self.value, self.why = field, value, why


def _finite(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each next token. `temperature=0` means greedy; `seed` makes sampling reproducible."""

  temperature: float = 0.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  min_p: float = 0.0  # 0 = off
  repetition_penalty: float = 1.0  # 1 = off
  presence_penalty: float = 0.0  # 0 = off
  seed: int = 0

  def __post_init__(self):
    def bad(field, why):
      raise SamplingOptionError(field, getattr(self, field), why)

    # Every check is written so that NaN fails it (NaN compares false); infinities are refused explicitly.
    if not (_finite(self.temperature) and self.temperature >= 0):
      bad("temperature", "must be a finite number >= 0 (0 = greedy)")
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
      bad("top_k", "must be an integer >= 0 (0 = off)")
    if not (_finite(self.top_p) and 0 < self.top_p <= 1):
      bad("top_p", "must be in (0, 1] (1 = off)")
    if not (_finite(self.min_p) and 0 <= self.min_p < 1):
      bad("min_p", "must be in [0, 1) (0 = off)")
    if not (_finite(self.repetition_penalty) and self.repetition_penalty > 0):
      bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
    if not _finite(self.presence_penalty):
      bad("presence_penalty", "must be a finite number (0 = off)")
    if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -2 ** 63 <= self.seed < 2 ** 63:
      bad("seed", "must be an integer that fits in 64 bits")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def strategy(self, vocab_size: int) -> "Strategy":
    return Strategy(greedy=self.greedy,
                    top_k=0 if self.greedy or self.top_k >= vocab_size else self.top_k,
                    top_p=not self.greedy and self.top_p < 1,
                    min_p=not self.greedy and self.min_p > 0,
                    repetition=self.repetition_penalty != 1,
                    presence=self.presence_penalty != 0)

  def values(self) -> "StrategyValues":
    f = lambda x: jnp.asarray(x, jnp.float32)
    return StrategyValues(f(max(self.temperature, 1e-6)), f(self.top_p), f(self.min_p),
                          f(self.repetition_penalty), f(self.presence_penalty))


@dataclasses.dataclass(frozen=True)
class Strategy:
  """The static part: which code is compiled. Hashable (a jit static argument)."""

  greedy: bool = True
  top_k: int = 0
  top_p: bool = False
  min_p: bool = False
  repetition: bool = False
  presence: bool = False

  @property
  def needs_seen(self) -> bool:
    return self.repetition or self.presence


class StrategyValues(NamedTuple):
  """The dynamic part: scalars (f32 arrays)."""

  temperature: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  repetition_penalty: jax.Array
  presence_penalty: jax.Array


def apply_penalties(logits: jax.Array, strategy: Strategy, values: StrategyValues,
                    seen: jax.Array | None, generated: jax.Array | None) -> jax.Array:
  """logits [B, V] f32; seen [B, V] bool (prompt + output); generated [B, V] bool (output only)."""
  if strategy.repetition:
    r = values.repetition_penalty
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
  if strategy.presence:
    logits = jnp.where(generated, logits - values.presence_penalty, logits)
  return logits


def _top_p_mask(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """[B, C] bool over candidates sorted descending: the smallest prefix whose probability reaches top_p."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each candidate
  return before < top_p  # the first candidate is always kept


def greedy_argmax(logits: jax.Array) -> jax.Array:
  """[B, V] -> [B] int32: the first index of each row's maximum (`jnp.argmax`, for rows without NaN).

  As a max and a min over an index mask: XLA CPU vectorizes both, not argmax's (value, index) reduction
  (about 4x faster at V = 262144; it runs once per decode step; docs/DESIGN.md).
  """
  best = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  first = jnp.min(jnp.where(logits == best, index, logits.shape[-1]), axis=-1)
  return jnp.minimum(first, logits.shape[-1] - 1)  # a row of NaN (no match) gives the last id, not V


def filter_and_sample(logits: jax.Array, key: jax.Array, strategy: Strategy,
                      values: StrategyValues) -> jax.Array:
  """Picks one token per row from logits [B, V] (penalties already applied) -> [B] int32."""
  if strategy.greedy:
    return greedy_argmax(logits)
  logits = logits / values.temperature
  if strategy.top_k or strategy.top_p:
    k = strategy.top_k or logits.shape[-1]
    cand, idx = jax.lax.top_k(logits, k)  # [B, C] sorted descending
  else:
    cand, idx = logits, None
  if strategy.top_p:
    cand = jnp.where(_top_p_mask(cand, values.top_p), cand, NEG_INF)
  if strategy.min_p:
    best = jnp.max(cand, axis=-1, keepdims=True)
    # p >= min_p * p_max  <=>  logit >= logit_max + log(min_p)
    cand = jnp.where(cand >= best + jnp.log(values.min_p), cand, NEG_INF)
  choice = jax.random.categorical(key, cand, axis=-1)
  if idx is not None:
    choice = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
  return choice.astype(jnp.int32)
