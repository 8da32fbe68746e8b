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
from gemma_jax.model.moe import MixtureOfExperts
from gemma_jax.model.sharding import ShardingContext, constrain, param_init

RESIDUAL_AXES = ("batch", "length", "act_embed")
GATING_EQN, LINEAR_EQN = "BTD,CFD->CBTF", "BTF,FD->BTD"
# Gemma 4's per-layer inputs: the model-level projection, each layer's gate and its projection back.
PLE_MODEL_EQN, PLE_GATE_EQN, PLE_OUT_EQN = "BTD,DX->BTX", "BTD,DP->BTP", "BTP,PD->BTD"


class FeedForward(nn.Module):
  """GeGLU: `(gelu_tanh(x W_gate) * (x W_up)) W_down`. gating_einsum [2, F, D] (0 = gate, 1 = up); linear [F, D].

  Two `Einsum`s in this module's scope (`nn.share_scope`, as the official library does): the parameters stay
  `mlp/gating_einsum` and `mlp/linear`, as in the checkpoints.
  """

  config: TransformerConfig
  matmul: Matmul = XLA
  hidden_dim: int | None = None  # F (None: config.hidden_dim; Gemma 4's double-wide layers: 2F)
  layer: int = 0  # the layer's index (which projections carry adapters: `config.lora_kwargs`)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    f = self.hidden_dim or c.hidden_dim
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), matmul=self.matmul)
    gating = Einsum((2, f, c.embed_dim), (None, "mlp", "embed"), weight_name="gating_einsum",
                    name="gate_up", **kw, **c.lora_kwargs(self.layer, "gating_einsum"))
    nn.share_scope(self, gating)
    gate_up = gating(GATING_EQN, x)
    hidden = jax.nn.gelu(gate_up[0], approximate=True) * gate_up[1]
    linear = Einsum((f, c.embed_dim), ("mlp", "embed"), weight_name="linear", name="down", **kw,
                    **c.lora_kwargs(self.layer, "linear"))
    nn.share_scope(self, linear)
    return linear(LINEAR_EQN, hidden)


class PerLayerInput(nn.Module):
  """Gemma 4 edge models, after the MLP: `norm(gelu_tanh(x W_gate) * per_layer_input) W_proj`, added to the
  residual. per_layer_input_gate [D, P], per_layer_projection [P, D]; per_layer_input [B, T, P] (see
  `PerLayerInputs`)."""

  config: TransformerConfig
  matmul: Matmul = XLA

  @nn.compact
  def __call__(self, x: jax.Array, per_layer_input: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), matmul=self.matmul)
    p = c.per_layer_input_dim
    gate = Einsum((c.embed_dim, p), ("embed", None), name="per_layer_input_gate", **kw)
    h = jax.nn.gelu(gate(PLE_GATE_EQN, x), approximate=True) * per_layer_input.astype(x.dtype)
    h = Einsum((p, c.embed_dim), (None, "embed"), name="per_layer_projection", **kw)(PLE_OUT_EQN, h)
    return RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype), c.norm_plus_one, name="norm")(h)


class PerLayerInputs(nn.Module):
  """Gemma 4 edge models' per-layer inputs [B, T, L, P]: a second table's rows (scaled by sqrt(P)) plus a
  normed projection of the scaled embeddings (times D^-1/2), the sum times 2^-1/2. embedding [V, L*P],
  per_layer_model_projection [D, L*P], norm [P]."""

  config: TransformerConfig
  matmul: Matmul = XLA

  @nn.compact
  def __call__(self, tokens: jax.Array, embedded: jax.Array) -> jax.Array:
    c = self.config
    dt = jnp.dtype(c.dtype)
    lp = c.num_layers * c.per_layer_input_dim
    table = self.param("embedding", param_init(nn.initializers.normal(stddev=1.0), ("vocab", None)),
                       (c.vocab_size, lp), jnp.dtype(c.param_dtype))
    rows = jnp.take(table, tokens, axis=0).astype(dt) * jnp.asarray(c.per_layer_input_dim ** 0.5, dt)
    proj = Einsum((c.embed_dim, lp), ("embed", None), dtype=dt, param_dtype=jnp.dtype(c.param_dtype),
                  matmul=self.matmul, name="per_layer_model_projection")(PLE_MODEL_EQN, embedded)
    shape = tokens.shape + (c.num_layers, c.per_layer_input_dim)
    proj = RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype), c.norm_plus_one, name="norm")(
        (proj * jnp.asarray(c.embed_dim ** -0.5, dt)).reshape(shape))
    return (proj + rows.reshape(shape)) * jnp.asarray(2.0 ** -0.5, dt)


class Block(nn.Module):
  """One layer; `index` picks its attention type, MLP width and whether it shares another layer's KV."""

  config: TransformerConfig
  index: int
  sharding: ShardingContext | None = None
  matmul: Matmul = XLA

  @nn.compact
  def __call__(self, x, positions, key_pos, segment_ids, cache, shared=None, per_layer_input=None):
    c, i = self.config, self.index
    norm = lambda name: RMSNorm(c.norm_eps, jnp.dtype(c.param_dtype), c.norm_plus_one, name=name)
    attn = Attention(c, c.attention_types[i], self.sharding, self.matmul, kv_shared=c.kv_source(i) is not None,
                     layer=i, name="attn")
    h, cache, attended = attn(norm("pre_attention_norm")(x), positions, key_pos, segment_ids, cache, shared)
    if c.use_post_attn_norm:
      h = norm("post_attention_norm")(h)
    x = constrain(x + h, RESIDUAL_AXES, self.sharding)
    h = FeedForward(c, self.matmul, c.mlp_dim_of(i), layer=i, name="mlp")(norm("pre_ffw_norm")(x))
    if c.num_experts:  # Gemma 4 26B-A4B: experts routed from the residual stream, beside the dense MLP
      experts = MixtureOfExperts(c, name="moe")(x, norm("pre_ffw_norm_2")(x))
      h = norm("post_ffw_norm_1")(h) + norm("post_ffw_norm_2")(experts)
    if c.use_post_ffw_norm:
      h = norm("post_ffw_norm")(h)
    x = x + h
    if c.per_layer_input_dim:
      x = x + PerLayerInput(c, self.matmul, name="per_layer")(x, per_layer_input)
    if c.use_layer_scalar:
      scalar = self.param("layer_scalar", param_init(nn.initializers.ones_init(), ("norm",)), (1,),
                          jnp.dtype(c.param_dtype))
      x = x * scalar.astype(x.dtype)
    return constrain(x, RESIDUAL_AXES, self.sharding), cache, attended


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
    self.layers = [block(c, i, self.sharding, self.matmul, name=f"layer_{i}") for i in range(c.num_layers)]
    if c.per_layer_input_dim:
      self.per_layer_inputs = PerLayerInputs(c, self.matmul)
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
    per_layer = self.per_layer_inputs(tokens, x) if self.config.per_layer_input_dim else None
    new_cache = {} if cache is not None else None
    attended = {}  # layer -> what it attended over, for the KV-shared layers
    for i, layer in enumerate(self.layers):
      name = f"layer_{i}"
      source = self.config.kv_source(i)
      x, layer_cache, attended[i] = layer(
          x, positions, key_pos, segment_ids, None if cache is None or source is not None else cache[name],
          None if source is None else attended[source], None if per_layer is None else per_layer[:, :, i])
      if cache is not None and source is None:  # KV-shared layers hold no cache
        new_cache[name] = layer_cache
    x = self.final_norm(x)
    if return_hidden:
      return x, new_cache
    logits = self.embedder.decode(x, self.config.final_logit_soft_cap)
    return constrain(logits, ("batch", "length", "vocab"), self.sharding), new_cache


def logits_from_hidden(hidden: jax.Array, embedding: jax.Array, config: TransformerConfig) -> jax.Array:
  """The output head applied to hidden [..., D] with the table [V', D] (a slice of rows is fine): f32 logits."""
  return tied_logits(hidden, embedding, config.final_logit_soft_cap)
