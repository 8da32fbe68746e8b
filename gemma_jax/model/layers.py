"""Basic layers: the matmul hook, Einsum, RMSNorm, Embedder and the tied output head. Every parameter carries
logical sharding axes."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_jax.model import lora
from gemma_jax.model.sharding import param_init


@dataclasses.dataclass(frozen=True)
class Matmul:
  """The model's one matmul hook, read only by `Einsum` and `Embedder` (and `tied_logits`): XLA's (jnp).

  A caller that stores the weights in another form (the sampler's `gemma_jax/sampling/weight_layout.py`) passes
  a subclass, down from `Transformer(..., matmul=...)`.
  """

  def einsum(self, eqn: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """`jnp.einsum(eqn, x, w)`, e.g. eqn 'BTD,NDH->BTNH'; `w` is a weight as the hook's owner stores it."""
    return jnp.einsum(eqn, x, w, preferred_element_type=preferred_element_type)

  def take(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows `tokens` [...] of the embedding table [V, D] -> [..., D]."""
    return jnp.take(table, tokens, axis=0)


XLA = Matmul()


class Einsum(nn.Module):
  """A weight `weight_name` of `shape` contracted with the input by `eqn`, e.g. 'BTD,NDH->BTNH'.

  With `lora_slots` (indices of the weight's stacked projections, see `lora.SLOTS`), each of those slots also
  has a low-rank adapter (`lora_<slot>_a`, `lora_<slot>_b`, rank `lora_rank`, f32, sharded as the weight's axes
  say), added as `lora_factor * (x a) b` (see `model/lora.py`).
  """

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_scale: float = 1.0
  matmul: Matmul = XLA
  weight_name: str = "w"
  lora_slots: tuple[int, ...] = ()
  lora_rank: int = 0
  lora_factor: float = 1.0

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param(self.weight_name, param_init(fan_in_init(self.shape, eqn, self.init_scale), self.axes),
                   self.shape, self.param_dtype)
    x = x.astype(self.dtype)
    y = self.matmul.einsum(eqn, x, w.astype(self.dtype))
    if not self.lora_slots:
      return y
    names = lora.SLOTS[self.weight_name if self.weight_name != "w" else self.name]
    a_shape, b_shape = lora.adapter_shapes(eqn, self.shape, self.lora_rank)
    a_axes, b_axes = lora.adapter_axes(eqn, self.axes)
    adapters = {}
    for i in self.lora_slots:  # f32 whatever the base's dtype (as peft's autocast_adapter_dtype)
      a = self.param(lora.leaf_name(names[i], "a"), param_init(lora.init_a, a_axes), a_shape, jnp.float32)
      b = self.param(lora.leaf_name(names[i], "b"), param_init(nn.initializers.zeros_init(), b_axes), b_shape,
                     jnp.float32)
      adapters[i] = (a, b)
    return lora.apply(eqn, y, x, adapters, self.lora_factor)


def fan_in_init(shape: Sequence[int], eqn: str | None, scale: float):
  """Normal init with std = scale / sqrt(fan_in), fan_in = the weight dims contracted with the input."""
  if eqn is None:
    fan_in = shape[-1]
  else:
    lhs, rest = eqn.split(",")
    w_letters = rest.split("->")[0]
    fan_in = 1
    for letter, n in zip(w_letters, shape):
      if letter in lhs:
        fan_in *= n
  return nn.initializers.normal(stddev=scale / max(fan_in, 1) ** 0.5)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """`x * rsqrt(mean(x^2) + eps)` over the last axis, in f32 (no learned scale: Gemma 4's value norm)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """`rms_normalize(x) * (1 + scale)`, scale from 0 (Gemma 1-3), or `* scale`, scale from 1 (`plus_one=False`,
  Gemma 4); computed in f32 and cast back."""

  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32
  plus_one: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
    scale = self.param("scale", param_init(init, ("norm",)), (x.shape[-1],), self.param_dtype).astype(jnp.float32)
    return (rms_normalize(x, self.eps) * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """`tanh(x / cap) * cap`; identity when `cap` is None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def tied_logits(hidden: jax.Array, table: jax.Array, cap: float | None, matmul: Matmul = XLA, *,
                vocab_major: bool = False) -> jax.Array:
  """The tied output head: hidden [..., D] by the embedding table [V, D] (a slice of rows is fine) -> f32 logits
  [..., V], soft-capped by `cap` (None: not capped). The product runs in hidden's dtype, accumulated in f32.

  vocab_major: hidden is [M, D] (a few rows: decode steps); computed as [V, M], then transposed, same numbers.
  XLA's CPU GEMM is faster so for the real 270M head at M = 8 (BENCHMARKS.md); the barrier keeps XLA from
  folding the transpose back into the product. Only for a hook that takes any operand order (`XLA`).
  """
  table = table.astype(hidden.dtype)
  if vocab_major:
    logits = matmul.einsum("VD,MD->VM", table, hidden, preferred_element_type=jnp.float32)
    logits = jax.lax.optimization_barrier(logits).T
  else:
    logits = matmul.einsum("...D,VD->...V", hidden, table, preferred_element_type=jnp.float32)
  return soft_cap(logits, cap)


class Embedder(nn.Module):
  """Token embedding table [V, D], shared with the output head (tied weights)."""

  vocab_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  matmul: Matmul = XLA

  def setup(self):
    self.input_embedding = self.param(
        "input_embedding", param_init(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.vocab_size, self.embed_dim), self.param_dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, D], scaled by sqrt(D) rounded to the compute dtype (as the reference does)."""
    x = self.matmul.take(self.input_embedding, tokens).astype(self.dtype)
    return x * jnp.asarray(self.embed_dim ** 0.5, dtype=self.dtype)

  def decode(self, x: jax.Array, cap: float | None = None) -> jax.Array:
    """x [B, T, D] -> logits [B, T, V] in f32, soft-capped by `cap` (see `tied_logits`)."""
    return tied_logits(x, self.input_embedding, cap, self.matmul)
