"""The Gemma transformer (families 1, 2 and 3, text), read top to bottom.

    tokens [B, T] -> embed * sqrt(D) -> L x Block -> final_norm -> tied head -> (soft-cap) -> logits [B, T, V]

    Block: x + post_attn_norm(attn(pre_attn_norm(x)))  then  x + post_ffw_norm(mlp(pre_ffw_norm(x)))
           (post-norms in Gemma 2/3 only; Gemma 3 adds QK-norm inside attention)

Parameter names follow the official Flax checkpoints (nested module layout): `embedder/input_embedding`,
`layer_{i}/attn/{q_einsum,kv_einsum,qkv_einsum,attn_vec_einsum}/w`, `layer_{i}/mlp/{gating_einsum,linear}`,
`layer_{i}/{pre_attention_norm,post_attention_norm,pre_ffw_norm,post_ffw_norm}/scale`, `final_norm/scale`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_jax.kernels import packed_matmul
from gemma_jax.model import kv_cache
from gemma_jax.model.attention import KV_EQN, OUT_EQN, Q_EQN, QKV_EQN, Attention
from gemma_jax.model.config import AttentionType, TransformerConfig
from gemma_jax.model.layers import HEAD_EQN, Embedder, RMSNorm, fan_in_init, soft_cap
from gemma_jax.model.sharding import ShardingContext, constrain, param_init

RESIDUAL_AXES = ("batch", "length", "act_embed")
GATING_EQN, LINEAR_EQN = "BTD,CFD->CBTF", "BTF,FD->BTD"


class FeedForward(nn.Module):
  """GeGLU: `(gelu_tanh(x W_gate) * (x W_up)) W_down`. gating_einsum [2, F, D] (0 = gate, 1 = up); linear [F, D]."""

  config: TransformerConfig
  packed: bool = False  # weights in `packed_matmul` panels (see `Einsum`)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    matmul = packed_matmul.einsum if self.packed else jnp.einsum
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    gating = self.param("gating_einsum", param_init(fan_in_init((2, c.hidden_dim, c.embed_dim), None, 1.0),
                                                    (None, "mlp", "embed")),
                        (2, c.hidden_dim, c.embed_dim), pdtype).astype(dtype)
    linear = self.param("linear", param_init(nn.initializers.normal(c.hidden_dim ** -0.5), ("mlp", "embed")),
                        (c.hidden_dim, c.embed_dim), pdtype).astype(dtype)
    gate_up = matmul(GATING_EQN, x, gating)
    hidden = jax.nn.gelu(gate_up[0], approximate=True) * gate_up[1]
    return matmul(LINEAR_EQN, hidden, linear)


class Block(nn.Module):
  config: TransformerConfig
  attn_type: AttentionType
  sharding: ShardingContext | None = None
  packed: bool = False

  @nn.compact
  def __call__(self, x, positions, key_pos, segment_ids, cache):
    c = self.config
    norm = lambda name: RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype), name=name)
    h, cache = Attention(c, self.attn_type, self.sharding, self.packed, name="attn")(
        norm("pre_attention_norm")(x), positions, key_pos, segment_ids, cache)
    if c.use_post_attn_norm:
      h = norm("post_attention_norm")(h)
    x = constrain(x + h, RESIDUAL_AXES, self.sharding)
    h = FeedForward(c, self.packed, name="mlp")(norm("pre_ffw_norm")(x))
    if c.use_post_ffw_norm:
      h = norm("post_ffw_norm")(h)
    return constrain(x + h, RESIDUAL_AXES, self.sharding), cache


def _block_class(remat: str):
  if remat == "none":
    return Block
  policy = {"block": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[remat]
  return nn.remat(Block, policy=policy, prevent_cse=True)


class Transformer(nn.Module):
  """`Transformer(config).apply({"params": params}, tokens, ...)` -> (logits [B, T, V] f32, cache).

  Args of `__call__`:
    tokens: [B, T] int32.
    positions: [B, T] absolute positions. Default: counted over `input_mask` (so a left- or right-padded row
      gets the positions it would have alone), continuing from the cache when one is given.
    input_mask: [B, T] bool, False on padding. Padding is never attended to; its logits are meaningless.
    segment_ids: [B, T] int32 for packed rows: tokens attend only within their segment (no cache).
    cache: a `kv_cache.Cache` to read and extend (sampling), or None (training, scoring).
    return_hidden: return the final-normed hidden states [B, T, D] instead of logits (for chunked losses,
      see `logits_from_hidden`).

  `packed=True` reads params from `pack_params` (f32, CPU, unsharded: the sampler's decoding).
  """

  config: TransformerConfig
  sharding: ShardingContext | None = None
  packed: bool = False

  def setup(self):
    c = self.config
    self.embedder = Embedder(c.vocab_size, c.embed_dim, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), self.packed)
    block = _block_class(c.remat)
    self.layers = [block(c, t, self.sharding, self.packed, name=f"layer_{i}")
                   for i, t in enumerate(c.attention_types)]
    self.final_norm = RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, input_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: kv_cache.Cache | None = None,
               return_hidden: bool = False) -> tuple[jax.Array, kv_cache.Cache | None]:
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
    if input_mask is None:
      input_mask = jnp.ones(tokens.shape, bool)
    if positions is None:
      positions = jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1
      if cache is not None:
        positions = positions + kv_cache.next_positions(cache)[:, None]
      positions = jnp.maximum(positions, 0)
    key_pos = jnp.where(input_mask, positions, -1)

    x = constrain(self.embedder.encode(tokens), RESIDUAL_AXES, self.sharding)
    new_cache = {} if cache is not None else None
    for i, layer in enumerate(self.layers):
      name = f"layer_{i}"
      x, layer_cache = layer(x, positions, key_pos, segment_ids, None if cache is None else cache[name])
      if cache is not None:
        new_cache[name] = layer_cache
    x = self.final_norm(x)
    if return_hidden:
      return x, new_cache
    logits = soft_cap(self.embedder.decode(x), self.config.final_logit_soft_cap)
    return constrain(logits, ("batch", "length", "vocab"), self.sharding), new_cache


def logits_from_hidden(hidden: jax.Array, embedding: jax.Array, config: TransformerConfig) -> jax.Array:
  """The output head applied to hidden [..., D] with the table [V', D] (a slice of rows is fine): f32 logits."""
  logits = jnp.einsum("...D,VD->...V", hidden, embedding.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return soft_cap(logits, config.final_logit_soft_cap)


def few_rows_logits(hidden: jax.Array, embedding: jax.Array, config: TransformerConfig,
                    packed: bool = False) -> jax.Array:
  """`logits_from_hidden` for a few rows (decode steps): hidden [B, D] -> f32 logits [B, V], same numbers.

  `packed`: `embedding` is in `pack_params` form; the product goes through the packed kernel.

  Computed vocabulary-major ([V, B], then transposed): for the real 270M head on the 2-core CPU box XLA then
  picks a 1.7x faster kernel at B = 8 (30 vs 51 ms; equal at B = 1). The barrier keeps XLA from folding the
  transpose back into the product, which would bring back the slow kernel.
  """
  if packed:
    return soft_cap(packed_matmul.einsum(HEAD_EQN, hidden[:, None], embedding)[:, 0], config.final_logit_soft_cap)
  logits = jnp.einsum("VD,BD->VB", embedding.astype(hidden.dtype), hidden, preferred_element_type=jnp.float32)
  return soft_cap(jax.lax.optimization_barrier(logits).T, config.final_logit_soft_cap)


# The einsum each matmul weight enters (by parameter name), for `pack_params`.
WEIGHT_EQNS = {"input_embedding": HEAD_EQN, "q_einsum": Q_EQN, "kv_einsum": KV_EQN, "qkv_einsum": QKV_EQN,
               "attn_vec_einsum": OUT_EQN, "gating_einsum": GATING_EQN, "linear": LINEAR_EQN}


def can_pack(config: TransformerConfig) -> bool:
  """Whether `Transformer(config, packed=True)` can run here: f32 params and compute, and the kernel built."""
  f32 = jnp.dtype(config.dtype) == jnp.float32 and jnp.dtype(config.param_dtype) == jnp.float32
  return f32 and packed_matmul.available()


def weight_name(path) -> str | None:
  """A params leaf's name from its tree path: the module's for an `Einsum` (`.../q_einsum/w` -> 'q_einsum'),
  else the leaf's own ('input_embedding', 'gating_einsum', 'scale', ...)."""
  names = [getattr(k, "key", None) for k in path]
  return names[-2] if names[-1] == "w" and len(names) >= 2 else names[-1]


def pack_params(params: dict) -> dict:
  """Every matmul weight of `params` in `packed_matmul` panels (same tree, same shapes) for `packed=True`."""
  def pack(path, x):
    name = weight_name(path)
    return packed_matmul.pack(WEIGHT_EQNS[name], x) if name in WEIGHT_EQNS else x
  return jax.tree_util.tree_map_with_path(pack, params)
