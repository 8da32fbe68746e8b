"""Rotary position embeddings, half-split convention (HF `rotate_half`, official Gemma)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, base_frequency: float, scale_factor: float = 1.0,
               fraction: float = 1.0) -> jax.Array:
  """Rotates x [B, T, N, H] by positions [B, T].

  Pair i of the two halves turns by angle `positions / scale_factor / base ** (2i / H)` (linear scaling
  divides the positions). With `fraction` < 1 ("proportional" RoPE, Gemma 4's global layers) only the first
  floor(fraction * H / 2) pairs turn, at those same frequencies; the rest are left as they are. Angles are
  computed in f32; the result has x's dtype.
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (base_frequency ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
  if fraction < 1.0:
    inv_freq = jnp.where(jnp.arange(h // 2) < int(fraction * h // 2), inv_freq, 0.0)
  angles = (positions.astype(jnp.float32) / scale_factor)[..., None] * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
