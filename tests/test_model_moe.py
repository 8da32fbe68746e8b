"""Gemma 4's mixture of experts: the router's choice and weights, the grouped dispatch against a per-token
loop, ties, and a sharded run (the experts split over the mesh) against an unsharded one. Parity with HF on a
whole model: tests/test_model_hf_parity.py (gemma4_moe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_config
from gemma_jax.model import ShardingContext, Transformer, init_params, make_mesh
from gemma_jax.model.moe import dispatch, route


def test_router_takes_the_top_k_renormalized_then_scaled_and_breaks_ties_by_lower_index():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  scale, per_expert = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32), jnp.arange(1.0, 7.0)
  weights, experts = route(x, w, scale, per_expert, 2, 1e-6)
  h = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6) * np.asarray(scale) * 8 ** -0.5
  p = np.exp(h @ np.asarray(w))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-p, -1, kind="stable")[:, :2]
  np.testing.assert_array_equal(np.asarray(experts), top)
  want = np.take_along_axis(p, top, -1)
  want = want / want.sum(-1, keepdims=True) * np.asarray(per_expert)[top]
  np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-5)
  _, tied = route(jnp.ones((2, 8)), jnp.zeros((8, 6)), jnp.ones(8), jnp.ones(6), 3, 1e-6)  # all equal
  np.testing.assert_array_equal(np.asarray(tied), [[0, 1, 2], [0, 1, 2]])


def test_grouped_dispatch_equals_a_loop_over_tokens():
  rng = np.random.default_rng(1)
  n, d, e, i, k = 7, 8, 5, 3, 2
  x = rng.normal(size=(n, d)).astype(np.float32)
  gating = rng.normal(size=(e, 2, i, d)).astype(np.float32)
  linear = rng.normal(size=(e, i, d)).astype(np.float32)
  experts = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
  weights = rng.uniform(size=(n, k)).astype(np.float32)
  got = np.asarray(dispatch(jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts), jnp.asarray(gating),
                            jnp.asarray(linear)))
  gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  want = np.zeros((n, d), np.float32)
  for t in range(n):
    for j in range(k):
      g = experts[t, j]
      want[t] += weights[t, j] * ((gelu(gating[g, 0] @ x[t]) * (gating[g, 1] @ x[t])) @ linear[g])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sharded_moe_forward_equals_unsharded():
  config = tiny_config("gemma4", num_experts=4, experts_per_token=2, expert_hidden_dim=16, vocab_size=256)
  ctx = ShardingContext(make_mesh("fsdp:2,tensor:4"))
  params = init_params(config, jax.random.key(0), sharding=ctx)
  gating = params["layer_0"]["moe"]["expert_gating"]
  assert gating.addressable_shards[0].data.shape[0] == 1  # 4 experts over tensor:4
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, config.vocab_size)
  sharded = jax.jit(lambda p, t: Transformer(config, ctx).apply({"params": p}, t)[0])(params, tokens)
  plain, _ = jax.jit(Transformer(config).apply)({"params": jax.tree.map(np.asarray, params)}, tokens)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), atol=1e-4)
