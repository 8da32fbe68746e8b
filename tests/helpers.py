"""Test helpers (plain functions, imported by the tests): tiny configs for every family, bitwise tree equality."""

from __future__ import annotations

import numpy as np

from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import flatten


def tiny_config(family: str, **overrides) -> TransformerConfig:
  """A small model of `family` with every feature that family has switched on."""
  base = dict(num_layers=4, embed_dim=48, hidden_dim=96, num_heads=4, num_kv_heads=2, head_dim=16,
              vocab_size=128, query_pre_attn_scalar=16, max_seq_len=256)
  if family == "gemma2":
    base.update(sliding_window_size=6, attn_logits_soft_cap=5.0, final_logit_soft_cap=3.0,
                use_post_attn_norm=True, use_post_ffw_norm=True, query_pre_attn_scalar=24)
  elif family == "gemma3":
    base.update(num_layers=7, sliding_window_size=6, use_post_attn_norm=True, use_post_ffw_norm=True,
                use_qk_norm=True, global_base_frequency=1_000_000.0, global_scale_factor=8.0,
                query_pre_attn_scalar=20)
  elif family == "gemma4":  # global layers 5 and 6: head dim 32, one kv head, keys = values, RoPE on 1/4;
    # per-layer inputs; layer 6 attends over layer 5's keys and values, with a double-wide MLP
    base.update(num_layers=7, sliding_window_size=6, use_post_attn_norm=True, use_post_ffw_norm=True,
                use_qk_norm=True, global_base_frequency=1_000_000.0, query_pre_attn_scalar=1.0,
                global_head_dim=32, num_global_kv_heads=1, global_k_eq_v=True, use_value_norm=True,
                global_rope_fraction=0.25, norm_plus_one=False, use_layer_scalar=True, final_logit_soft_cap=3.0,
                per_layer_input_dim=8, num_kv_shared_layers=1, double_wide_shared_mlp=True)
  base.update(overrides)
  return TransformerConfig(family=family, **base)


def assert_trees_bitwise_equal(a, b) -> None:
  """Same flat names, dtypes and bits (so -0.0 != 0.0 and NaN payloads count)."""
  def bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])

  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(bits(fa[k]), bits(fb[k]), err_msg=k)
