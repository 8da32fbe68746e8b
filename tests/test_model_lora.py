"""Low-rank adapters in the model (gemma_jax/model/lora.py): zero b is bitwise the base, folded adapters are
the adapted model, shapes and names of every weight kind, target patterns, peft's scale and init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_bitwise_equal, tiny_config
from gemma_jax.errors import ConfigError
from gemma_jax.model import lora
from gemma_jax.model.params import flatten, fold_adapters, init_params
from gemma_jax.model.transformer import Transformer

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)), jnp.int32)
# gemma1 with K = N: the fused qkv_einsum (three slots); gemma3: q_einsum + kv_einsum (two slots); gemma4: K = V
# global layers (k_einsum), a KV-shared layer (queries only) and a double-wide MLP.
FAMILIES = [("gemma1", dict(num_kv_heads=4)), ("gemma3", {}), ("gemma4", {})]


def _logits(config, params):
  return np.asarray(Transformer(config).apply({"params": params}, TOKENS)[0])


@pytest.mark.parametrize("family,over", FAMILIES)
def test_zero_b_is_the_base_and_folding_is_exact(family, over):
  config = tiny_config(family, lora_rank=3, lora_alpha=5.0, **over)
  params = init_params(config, jax.random.key(0))
  base, adapters = lora.split(params)
  assert_trees_bitwise_equal(lora.split(lora.attach(base, adapters))[0], base)
  plain = _logits(config.replace(lora_rank=0), base)
  np.testing.assert_array_equal(_logits(config, params), plain)  # fresh adapters: b = 0, bitwise the base
  keys = iter(jax.random.split(jax.random.key(1), 200))
  moved = lora.attach(base, jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), adapters))
  adapted = _logits(config, moved)
  assert np.abs(adapted - plain).max() > 1e-2
  folded_config, folded = fold_adapters(config, moved)
  assert folded_config.lora_rank == 0 and not lora.split(folded)[1]
  np.testing.assert_allclose(_logits(folded_config, folded), adapted, atol=1e-5, rtol=1e-6)  # f32 rounding
  np.testing.assert_array_equal(_logits(config, lora.scale_b(moved, 0.0)), plain)


def test_adapter_shapes_follow_each_weight():
  config = tiny_config("gemma4", lora_rank=2)
  flat = {k: v.shape for k, v in flatten(lora.split(init_params(config, jax.random.key(0)))[1]).items()}
  n, k, h, d, f = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim, config.hidden_dim
  assert flat["layer_0/attn/q_einsum/lora_q_a"] == (d, 2) and flat["layer_0/attn/q_einsum/lora_q_b"] == (2, n, h)
  assert flat["layer_0/attn/kv_einsum/lora_v_b"] == (2, k, h)
  assert flat["layer_0/attn/attn_vec_einsum/lora_o_a"] == (n, h, 2)
  assert flat["layer_5/attn/k_einsum/lora_k_b"] == (2, 1, 32)  # the global layer's own kv heads and head dim
  assert "layer_5/attn/k_einsum/lora_v_a" not in flat  # K = V: one projection, peft's k_proj
  assert not any(k.startswith("layer_6/attn/k") for k in flat)  # the KV-shared layer has queries only
  assert flat["layer_6/mlp/lora_down_a"] == (2 * f, 2) and flat["layer_0/mlp/lora_gate_b"] == (2, f)
  a = np.asarray(lora.split(init_params(config, jax.random.key(0)))[1]["layer_0"]["mlp"]["lora_down_a"])
  assert 0 < np.abs(a).max() <= f ** -0.5  # peft's kaiming-uniform bound, 1 / sqrt(fan_in)


def test_targets_pick_projections_and_layers():
  config = tiny_config("gemma3", lora_rank=2, lora_targets="q_proj,layer_1/(v|down)")
  names = {k for k in flatten(lora.split(init_params(config, jax.random.key(0)))[1])}
  assert {k.rsplit("/", 1)[1] for k in names if k.startswith("layer_0/")} == {"lora_q_a", "lora_q_b"}
  assert {k.rsplit("/", 1)[1] for k in names if k.startswith("layer_1/")} == {
      "lora_q_a", "lora_q_b", "lora_v_a", "lora_v_b", "lora_down_a", "lora_down_b"}
  assert lora.scale(16.0, 4) == 4.0 and lora.scale(16.0, 4, rslora=True) == 8.0
  for bad, why in (("qq", "names no projection"), ("layer_99/q", "names no projection"), ("(q", "not a regular")):
    with pytest.raises(ConfigError, match=why):
      tiny_config("gemma3", lora_rank=2, lora_targets=bad)
