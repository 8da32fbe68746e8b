"""Basic layers: Einsum, RMSNorm, Embedder. Every parameter carries logical sharding axes."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_jax.kernels import packed_matmul
from gemma_jax.model.sharding import param_init

HEAD_EQN = "BTD,VD->BTV"  # the tied output head


class Einsum(nn.Module):
  """A weight `w` of `shape` contracted with the input by `eqn`, e.g. 'BTD,NDH->BTNH'.

  `packed`: `w` holds `packed_matmul.pack(eqn, w)` (f32 CPU decoding; see gemma_jax/kernels).
  """

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_scale: float = 1.0
  packed: bool = False

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param("w", param_init(fan_in_init(self.shape, eqn, self.init_scale), self.axes), self.shape,
                   self.param_dtype)
    if self.packed:
      return packed_matmul.einsum(eqn, x, w)
    return jnp.einsum(eqn, x.astype(self.dtype), w.astype(self.dtype))


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


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * (1 + scale)`, computed in f32 and cast back; `scale` starts at 0."""

  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", param_init(nn.initializers.zeros_init(), ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
  """Token embedding table [V, D], shared with the output head (tied weights).

  `packed`: the table holds `packed_matmul.pack(HEAD_EQN, table)` (f32 CPU decoding).
  """

  vocab_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  packed: bool = False

  def setup(self):
    self.input_embedding = self.param(
        "input_embedding", param_init(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.vocab_size, self.embed_dim), self.param_dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, D], scaled by sqrt(D) rounded to the compute dtype (as the reference does)."""
    if self.packed:
      x = packed_matmul.take_columns(HEAD_EQN, self.input_embedding, tokens)
    else:
      x = jnp.take(self.input_embedding, tokens, axis=0).astype(self.dtype)
    return x * jnp.asarray(self.embed_dim ** 0.5, dtype=self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> logits [B, T, V] in f32."""
    if self.packed:
      return packed_matmul.einsum(HEAD_EQN, x, self.input_embedding)
    return jnp.einsum("BTD,VD->BTV", x, self.input_embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """`tanh(x / cap) * cap`; identity when `cap` is None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap
