"""Gemma 4's mixture of experts (26B-A4B): a router picks k of E GeGLU experts per token, beside the dense MLP.

    router:  p = softmax((rms_normalize(x) * scale * D^-1/2) W_router)          [N, E] f32
             top-k of p (ties: the lower expert index first), renormalized to sum 1, times per_expert_scale
    experts: y = sum_k w_k * (gelu_tanh(x G_e) * (x U_e)) W_down_e            for the k chosen experts e

Dispatch: the N*k (token, expert) assignments sorted by expert, then two grouped matmuls (`jax.lax.ragged_dot`)
over the sorted rows, and a scatter-add back to the tokens. Shapes are static: [N*k, D] rows in, [N*k, 2I] and
[N*k, D] out, so one compile serves every routing. FLOPs: 6 * N * k * D * I (the chosen experts only, as an
ideal dispatch; no capacity limit, no token dropped); memory: the [N*k, 2I] activations.

Parameters (`layer_i/moe/...`): router_w [D, E], router_scale [D], per_expert_scale [E], expert_gating
[E, 2, I, D] (0 = gate, 1 = up), expert_linear [E, I, D]. They are read directly, not through the matmul hook,
so the sampler's packed layout leaves them as they are. Letters: N tokens, D model, E experts, I expert width, k experts per token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.layers import fan_in_init, rms_normalize
from gemma_jax.model.sharding import param_init


def route(x: jax.Array, w: jax.Array, scale: jax.Array, per_expert_scale: jax.Array, k: int, eps: float
          ) -> tuple[jax.Array, jax.Array]:
  """x [N, D] -> (weights [N, k] f32, experts [N, k] int32), as HF's Gemma4TextRouter."""
  d = x.shape[-1]
  h = rms_normalize(x, eps) * scale.astype(jnp.float32) * (d ** -0.5)
  probs = jax.nn.softmax(jnp.einsum("ND,DE->NE", h.astype(x.dtype), w.astype(x.dtype),
                                    preferred_element_type=jnp.float32), axis=-1)
  top, idx = jax.lax.top_k(probs, k)
  top = top / jnp.sum(top, axis=-1, keepdims=True)
  return top * per_expert_scale.astype(jnp.float32)[idx], idx


def dispatch(x: jax.Array, weights: jax.Array, experts: jax.Array, gating: jax.Array, linear: jax.Array
             ) -> jax.Array:
  """sum over each token's k experts of weight * expert(x): x [N, D], weights/experts [N, k],
  gating [E, 2, I, D], linear [E, I, D] -> [N, D]."""
  n, k = experts.shape
  e = gating.shape[0]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
  token = order // k
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  rows = x[token]  # [N*k, D]
  gate_up = jax.lax.ragged_dot(rows, jnp.transpose(gating, (0, 3, 1, 2)).reshape(e, x.shape[-1], -1), sizes,
                               preferred_element_type=jnp.float32).astype(x.dtype)
  gate, up = jnp.split(gate_up, 2, axis=-1)
  hidden = jax.nn.gelu(gate, approximate=True) * up
  out = jax.lax.ragged_dot(hidden, linear.astype(x.dtype), sizes, preferred_element_type=jnp.float32)
  out = out * weights.reshape(-1)[order][:, None]
  return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(out).astype(x.dtype)


class MixtureOfExperts(nn.Module):
  """x [B, T, D] (the block's residual stream, as HF routes it) -> [B, T, D]; `expert_input` is what the
  experts read (HF: pre_feedforward_layernorm_2 of the same stream)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, expert_input: jax.Array) -> jax.Array:
    c = self.config
    pd, dt = jnp.dtype(c.param_dtype), jnp.dtype(c.dtype)
    e, i, d = c.num_experts, c.expert_hidden_dim, c.embed_dim
    router = self.param("router_w", param_init(fan_in_init((d, e), "ND,DE->NE", 1.0), ("embed", None)), (d, e), pd)
    scale = self.param("router_scale", param_init(nn.initializers.ones_init(), ("norm",)), (d,), pd)
    per_expert = self.param("per_expert_scale", param_init(nn.initializers.ones_init(), (None,)), (e,), pd)
    gating = self.param("expert_gating", param_init(fan_in_init((e, 2, i, d), "ND,ECID->NECI", 1.0),
                                                    ("expert", None, None, "embed")), (e, 2, i, d), pd)
    linear = self.param("expert_linear", param_init(fan_in_init((e, i, d), "NI,EID->NED", 1.0),
                                             ("expert", None, "embed")), (e, i, d), pd)
    b, t, _ = x.shape
    weights, experts = route(x.reshape(b * t, d).astype(dt), router, scale, per_expert, c.experts_per_token,
                             c.norm_eps)
    y = dispatch(expert_input.reshape(b * t, d).astype(dt), weights, experts, gating.astype(dt), linear.astype(dt))
    return y.reshape(b, t, d)
