"""Multi-head attention with GQA/MQA, QK-norm, RoPE, soft-capping, sliding windows and a KV cache.

Letters: B batch, T query length, S key length, D model, N query heads, K kv heads, G = N / K heads per kv
head, H head dim. K and H are the layer's own (`config.kv_heads_of` / `head_dim_of`): Gemma 4's global layers
have more dims and fewer kv heads, and may take keys and values from one projection (`k_einsum`), with a
scale-free norm on the values and RoPE on a fraction of the pairs. A KV-shared layer (`kv_shared`, Gemma 4's
last layers) has no key/value projections and no cache: it attends over the keys and values its source layer
attended over (`SharedKV`, passed in by the transformer).

Visibility is decided by positions alone: key position p is visible from query position q iff
`0 <= p <= q` (and `q - W < p` on sliding-window layers), and, for packed rows, the segments match.
Padding tokens get key position -1, so no query ever sees them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_jax.model import kv_cache
from gemma_jax.model.config import AttentionType, TransformerConfig
from gemma_jax.model.layers import XLA, Einsum, Matmul, RMSNorm, rms_normalize, soft_cap
from gemma_jax.model.rope import apply_rope
from gemma_jax.model.sharding import ShardingContext, constrain

# The projections (see `Attention.__call__`).
Q_EQN, KV_EQN, QKV_EQN, OUT_EQN = "BTD,NDH->BTNH", "BTD,CKDH->CBTKH", "BTD,CNDH->CBTNH", "BTNH,NHD->BTD"
K_EQN = "BTD,KDH->BTKH"

# What a layer attended over, for the KV-shared layers after it: keys, values [B, S, K, H], key positions
# [B, S] and key segments [B, S] (or None).
SharedKV = tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]

# The official implementation's mask value: finite, so a fully masked row (padding) gives no NaN.
MASK_VALUE = -2.3819763e38


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None,
                   q_seg: jax.Array | None = None, k_seg: jax.Array | None = None) -> jax.Array:
  """[B, T, S] bool: which keys each query sees. q_pos [B, T], k_pos [B, S] (-1 = never visible)."""
  q = q_pos[:, :, None]
  k = k_pos[:, None, :]
  visible = (k >= 0) & (k <= q)
  if window is not None:
    visible &= k > q - window
  if q_seg is not None:
    visible &= q_seg[:, :, None] == k_seg[:, None, :]
  return visible


class Attention(nn.Module):
  config: TransformerConfig
  attn_type: AttentionType
  sharding: ShardingContext | None = None
  matmul: Matmul = XLA  # passed to the projections (see `Matmul`)
  kv_shared: bool = False  # attends over another layer's keys and values (no k/v projections, no cache)
  layer: int = 0  # the layer's index (which projections carry adapters: `config.lora_kwargs`)

  def setup(self):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), matmul=self.matmul)
    n, k, h = c.num_heads, self.num_kv_heads, self.head_dim
    lo = lambda weight: c.lora_kwargs(self.layer, weight)  # its adapters, when the config asks for them
    if self.kv_shared:
      self.q_einsum = Einsum((n, c.embed_dim, h), ("heads", "embed", "head_dim"), **kw, **lo("q_einsum"))
    elif c.k_eq_v(self.attn_type):  # one projection: keys, and values before their norm
      self.q_einsum = Einsum((n, c.embed_dim, h), ("heads", "embed", "head_dim"), **kw, **lo("q_einsum"))
      self.k_einsum = Einsum((k, c.embed_dim, h), ("kv_heads", "embed", "head_dim"), **kw, **lo("k_einsum"))
    elif n == k:  # MHA: one fused projection, as in the official checkpoints
      self.qkv_einsum = Einsum((3, n, c.embed_dim, h), (None, "heads", "embed", "head_dim"), **kw,
                               **lo("qkv_einsum"))
    else:
      self.q_einsum = Einsum((n, c.embed_dim, h), ("heads", "embed", "head_dim"), **kw, **lo("q_einsum"))
      self.kv_einsum = Einsum((2, k, c.embed_dim, h), (None, "kv_heads", "embed", "head_dim"), **kw,
                              **lo("kv_einsum"))
    self.attn_vec_einsum = Einsum((n, h, c.embed_dim), ("heads", "head_dim", "embed"), **kw,
                                  **lo("attn_vec_einsum"))
    if c.use_qk_norm:
      self._query_norm = RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype), c.norm_plus_one)
      if not self.kv_shared:
        self._key_norm = RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype), c.norm_plus_one)

  @property
  def head_dim(self) -> int:
    return self.config.head_dim_of(self.attn_type)

  @property
  def num_kv_heads(self) -> int:
    return self.config.kv_heads_of(self.attn_type)

  @property
  def window(self) -> int | None:
    return self.config.sliding_window_size if self.attn_type == AttentionType.LOCAL else None

  def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    c = self.config
    is_global = self.attn_type == AttentionType.GLOBAL
    return apply_rope(x, positions, base_frequency=c.global_base_frequency if is_global else c.local_base_frequency,
                      scale_factor=c.global_scale_factor if is_global else 1.0,
                      fraction=c.global_rope_fraction if is_global else 1.0)

  def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """q [B, T, N, H] and k, v [B, T, K, H] (None on a KV-shared layer), before RoPE and norms."""
    c = self.config
    if self.kv_shared:
      return self.q_einsum(Q_EQN, x), None, None
    if c.k_eq_v(self.attn_type):
      k = self.k_einsum(K_EQN, x)
      return self.q_einsum(Q_EQN, x), k, k
    if c.num_heads == self.num_kv_heads:
      return tuple(self.qkv_einsum(QKV_EQN, x))
    k, v = self.kv_einsum(KV_EQN, x)
    return self.q_einsum(Q_EQN, x), k, v

  def __call__(self, x: jax.Array, positions: jax.Array, key_pos: jax.Array,
               segment_ids: jax.Array | None, cache: kv_cache.LayerCache | None, shared: SharedKV | None = None
               ) -> tuple[jax.Array, kv_cache.LayerCache | None, SharedKV]:
    """x [B, T, D]; positions [B, T]; key_pos [B, T] (positions, -1 on padding); `shared`: what the source
    layer attended over (KV-shared layers only).

    Returns [B, T, D], the updated layer cache (None without one) and what this layer attended over.
    """
    c = self.config
    q, k, v = self._project(x)
    if c.use_qk_norm:
      q = self._query_norm(q)
    q = self._rope(q, positions)
    if c.query_scale != 1.0:  # Gemma 4 has none (the QK-norm scales)
      q = q * jnp.asarray(c.query_scale, q.dtype)

    q_seg = segment_ids if cache is None else None
    new_cache = None
    if self.kv_shared:
      keys, values, k_pos, k_seg = shared
    else:
      if c.use_qk_norm:
        k = self._key_norm(k)
      if c.use_value_norm:
        v = rms_normalize(v, c.norm_eps).astype(v.dtype)
      k = self._rope(k, positions)
      k_seg = q_seg
      if cache is None:
        keys, values, k_pos = k, v, key_pos
      elif x.shape[1] == 1:  # decode: write first; the slot it overwrites is already outside the window
        new_cache = kv_cache.write(cache, k, v, key_pos)
        keys, values, k_pos = new_cache["k"], new_cache["v"], new_cache["pos"]
      else:  # a chunk on top of a cache: attend over old slots plus the chunk, then write
        keys = jnp.concatenate([cache["k"].astype(k.dtype), k], axis=1)
        values = jnp.concatenate([cache["v"].astype(v.dtype), v], axis=1)
        k_pos = jnp.concatenate([cache["pos"], key_pos], axis=1)
        new_cache = kv_cache.write(cache, k, v, key_pos)

    b, t, n, h = q.shape
    q = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    logits = soft_cap(logits, c.attn_logits_soft_cap)
    mask = attention_mask(positions, k_pos, self.window, q_seg, k_seg)
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values).reshape(b, t, n, h)
    encoded = constrain(encoded, ("batch", "length", "heads", "head_dim"), self.sharding)
    return self.attn_vec_einsum(OUT_EQN, encoded), new_cache, (keys, values, k_pos, k_seg)
