"""The Gemma transformer (families 1 to 4, text), read top to bottom.

    tokens [B, T] -> embed * sqrt(D) -> L x Block -> final_norm -> tied head -> (soft-cap) -> logits [B, T, V]

    Block: x + post_attn_norm(attn(pre_attn_norm(x)))  then  x + post_ffw_norm(mlp(pre_ffw_norm(x)))
           (post-norms in Gemma 2-4 only; Gemma 3 and 4 add QK-norm inside attention; Gemma 4 multiplies the
           block's output by a learned `layer_scalar` [1])

Parameter names follow the official Flax checkpoints (nested module layout): `embedder/input_embedding`,
`layer_{i}/attn/{q_einsum,kv_einsum,qkv_einsum,attn_vec_einsum}/w`, `layer_{i}/mlp/{gating_einsum,linear}`,
`layer_{i}/{pre_attention_norm,post_attention_norm,pre_ffw_norm,post_ffw_norm}/scale`, `final_norm/scale`;
Gemma 4 adds `layer_{i}/attn/k_einsum/w` (keys = values on global layers) and `layer_{i}/layer_scalar`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_jax.model import kv_cache
from gemma_jax.model.attention import Attention
from gemma_jax.model.config import AttentionType, TransformerConfig
from gemma_jax.model.layers import XLA, Einsum, Embedder, Matmul, RMSNorm, tied_logits
from gemma_jax.model.sharding import ShardingContext, constrain, param_init

RESIDUAL_AXES = ("batch", "length", "act_embed")
GATING_EQN, LINEAR_EQN = "BTD,CFD->CBTF", "BTF,FD->BTD"


class FeedForward(nn.Module):
  """GeGLU: `(gelu_tanh(x W_gate) * (x W_up)) W_down`. gating_einsum [2, F, D] (0 = gate, 1 = up); linear [F, D].

  Two `Einsum`s in this module's scope (`nn.share_scope`, as the official library does): the parameters stay
  `mlp/gating_einsum` and `mlp/linear`, as in the checkpoints.
  """

  config: TransformerConfig
  matmul: Matmul = XLA

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), matmul=self.matmul)
    gating = Einsum((2, c.hidden_dim, c.embed_dim), (None, "mlp", "embed"), weight_name="gating_einsum",
                    name="gate_up", **kw)
    nn.share_scope(self, gating)
    gate_up = gating(GATING_EQN, x)
    hidden = jax.nn.gelu(gate_up[0], approximate=True) * gate_up[1]
    linear = Einsum((c.hidden_dim, c.embed_dim), ("mlp", "embed"), weight_name="linear", name="down", **kw)
    nn.share_scope(self, linear)
    return linear(LINEAR_EQN, hidden)


class Block(nn.Module):
  config: TransformerConfig
  attn_type: AttentionType
  sharding: ShardingContext | None = None
  matmul: Matmul = XLA

  @nn.compact
  def __call__(self, x, positions, key_pos, segment_ids, cache):
    c = self.config
    norm = lambda name: RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype), c.norm_plus_one, name=name)
    h, cache = Attention(c, self.attn_type, self.sharding, self.matmul, name="attn")(
        norm("pre_attention_norm")(x), positions, key_pos, segment_ids, cache)
    if c.use_post_attn_norm:
      h = norm("post_attention_norm")(h)
    x = constrain(x + h, RESIDUAL_AXES, self.sharding)
    h = FeedForward(c, self.matmul, name="mlp")(norm("pre_ffw_norm")(x))
    if c.use_post_ffw_norm:
      h = norm("post_ffw_norm")(h)
    x = x + h
    if c.use_layer_scalar:
      scalar = self.param("layer_scalar", param_init(nn.initializers.ones_init(), ("norm",)), (1,),
                          jnp.dtype(c.param_dtype))
      x = x * scalar.astype(x.dtype)
    return constrain(x, RESIDUAL_AXES, self.sharding), cache


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

  `matmul`: the hook every weight product goes through (`layers.Matmul`); the default is XLA's. The sampler
  passes its own for weights it stores in another form (gemma_jax/sampling/weight_layout.py).
  """

  config: TransformerConfig
  sharding: ShardingContext | None = None
  matmul: Matmul = XLA

  def setup(self):
    c = self.config
    self.embedder = Embedder(c.vocab_size, c.embed_dim, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), self.matmul)
    block = _block_class(c.remat)
    self.layers = [block(c, t, self.sharding, self.matmul, name=f"layer_{i}")
                   for i, t in enumerate(c.attention_types)]
    self.final_norm = RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype), c.norm_plus_one)

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
    logits = self.embedder.decode(x, self.config.final_logit_soft_cap)
    return constrain(logits, ("batch", "length", "vocab"), self.sharding), new_cache


def logits_from_hidden(hidden: jax.Array, embedding: jax.Array, config: TransformerConfig) -> jax.Array:
  """The output head applied to hidden [..., D] with the table [V', D] (a slice of rows is fine): f32 logits."""
  return tied_logits(hidden, embedding, config.final_logit_soft_cap)
