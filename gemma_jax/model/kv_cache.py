"""The KV cache: per layer, keys and values plus the absolute position held in each slot.

Layout of one layer's cache (a dict, so the whole cache is a plain pytree):
  k, v: [B, S, K, H]   S = cache length of that layer; K, H the layer's own (Gemma 4's global layers differ)
  pos:  [B, S] int32    absolute position of the token in each slot; -1 = empty

Global layers have S = the cache's max length; sliding-window layers have S = min(W, max length) and use
the slots as a ring buffer (a token at position p lives in slot p % S), so their memory does not grow with
the context. Attention masks come from `pos`, so a slot is visible exactly when its token is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemma_jax.model.config import AttentionType, TransformerConfig

LayerCache = dict[str, jax.Array]
Cache = dict[str, LayerCache]

CACHE_AXES = {"k": ("batch", "cache_length", "kv_heads", "head_dim"),
              "v": ("batch", "cache_length", "kv_heads", "head_dim"),
              "pos": ("batch", "cache_length")}


def layer_cache_length(config: TransformerConfig, layer: int, max_len: int) -> int:
  if config.attention_types[layer] == AttentionType.LOCAL:
    return min(config.sliding_window_size, max_len)
  return max_len


def init_cache(config: TransformerConfig, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
  """An empty cache for `batch_size` rows and positions < `max_len`."""
  dtype = jnp.dtype(dtype or config.dtype)
  cache = {}
  for i in range(config.num_layers):
    if config.kv_source(i) is not None:  # KV-shared: attends over its source layer's entries
      continue
    s = layer_cache_length(config, i, max_len)
    t = config.attention_types[i]
    shape = (batch_size, s, config.kv_heads_of(t), config.head_dim_of(t))
    cache[f"layer_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                           "pos": jnp.full((batch_size, s), -1, jnp.int32)}
  return cache


def cache_axes(cache: Cache) -> Any:
  """Logical axes for every cache array (for sharding the cache on a mesh)."""
  return {name: dict(CACHE_AXES) for name in cache}


def write(layer: LayerCache, k: jax.Array, v: jax.Array, key_pos: jax.Array) -> LayerCache:
  """Writes a chunk k, v [B, T, K, H] at positions key_pos [B, T] (-1 = padding, not written).

  Slot = p % S. Of a chunk longer than S only each row's last S positions are kept, so no two writes of
  one row meet in a slot; dropped tokens (padding, evicted) are scattered out of bounds and discarded.
  """
  s = layer["pos"].shape[1]
  row_max = jnp.max(key_pos, axis=1, keepdims=True)
  keep = (key_pos >= 0) & (key_pos > row_max - s)
  slot = jnp.where(keep, key_pos % s, s)  # s is out of bounds -> dropped

  def scatter(buf, idx, new):
    return buf.at[idx].set(new.astype(buf.dtype), mode="drop")

  return {"k": jax.vmap(scatter)(layer["k"], slot, k),
          "v": jax.vmap(scatter)(layer["v"], slot, v),
          "pos": jax.vmap(scatter)(layer["pos"], slot, key_pos.astype(jnp.int32))}


def next_positions(cache: Cache) -> jax.Array:
  """[B]: one past the last position written in each row (0 for an empty row)."""
  return jnp.max(cache["layer_0"]["pos"], axis=1) + 1 if "layer_0" in cache else None
