"""The shapes that reach the compiler: prompt length and cache length buckets, and growing a cache to a bigger
bucket (chat turns).

Prompt lengths: 16, 24, 32, 48, 64, ... up to the prefill chunk, then multiples of it. Cache lengths: powers
of two. Everything else the decode takes (max_new_tokens, steps per call, stop ids, strategy numbers) is a
traced value, so none of it recompiles.
"""

from __future__ import annotations

import jax.numpy as jnp

from gemma_jax.model import kv_cache
from gemma_jax.model.config import TransformerConfig


def bucket_length(n: int, chunk: int, minimum: int = 16) -> int:
  """Prompt length bucket: the first of minimum * (1, 1.5, 2, 3, 4, 6, 8, ...) >= n, up to `chunk`, then a
  multiple of `chunk`. The half steps cap the padding at a third of the bucket (not half, as powers of two
  would): prefill is compute-bound, so padding costs time to first token in proportion."""
  if n <= chunk:
    b = minimum
    while b < n:
      b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 16 -> 24 -> 32 -> 48 -> 64 ...
    return min(b, chunk)
  return -(-n // chunk) * chunk


def cache_bucket(n: int, minimum: int = 128) -> int:
  """Cache length bucket: the power of two >= max(n, minimum)."""
  b = minimum
  while b < n:
    b *= 2
  return b


def grow_cache(cache: kv_cache.Cache, config: TransformerConfig, max_len: int) -> kv_cache.Cache:
  """The same cache with room for positions < max_len (appends empty slots; slots of old tokens keep p % S).

  Valid because every written position p is below the old length S of global layers (slot p stays p) and a
  sliding layer only grows while it is shorter than its window (so it has never wrapped).
  """
  out = {}
  for name, layer in cache.items():
    i = int(name.split("_")[1])
    s_new, s_old = kv_cache.layer_cache_length(config, i, max_len), layer["pos"].shape[1]
    if s_new == s_old:
      out[name] = layer
      continue
    pad = s_new - s_old
    kv_pad = ((0, 0), (0, pad), (0, 0), (0, 0))
    out[name] = {"k": jnp.pad(layer["k"], kv_pad), "v": jnp.pad(layer["v"], kv_pad),
                 "pos": jnp.pad(layer["pos"], ((0, 0), (0, pad)), constant_values=-1)}
  return out
