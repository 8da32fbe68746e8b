"""Logits parity with HF transformers on random tiny Gemma 1-4 models (fixtures: tools/make_hf_fixtures.py).

The fixtures cover MQA, MHA and GQA, head_dim != D/N, query_pre_attn_scalar != head_dim, soft-caps that bite,
Gemma 3 QK-norm with local/global RoPE bases and linear scaling 8, sequences longer than the window, and
Gemma 4 (dense): unscaled queries, value norm, weight-scaled norms, layer scalars, global layers with their own
head dim and proportional RoPE, (gemma4_kv) keys = values with their own kv-head count, and (gemma4_edge)
per-layer inputs, KV-shared last layers and their double-wide MLPs, and (gemma4_moe) 8 experts, top 2, beside
the dense MLP.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.convert.hf import read_hf
from gemma_jax.model.config import AttentionType
from gemma_jax.model.transformer import Transformer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("gemma1_mqa", "gemma1_mha", "gemma2", "gemma3", "gemma4", "gemma4_kv", "gemma4_edge", "gemma4_moe")
TOL = 1e-4


def load(name):
  d = os.path.join(FIXTURES, name)
  imp = read_hf(d, progress=False)
  tokens = np.load(os.path.join(d, "inputs.npz"))["tokens"].astype(np.int32)
  ref = np.load(os.path.join(d, "logits.npz"))["logits"]
  return imp.config, imp.params, tokens, ref


def forward(config, params, tokens, **kw):
  logits, _ = jax.jit(lambda p, t, kw: Transformer(config).apply({"params": p}, t, **kw))(params, tokens, kw)
  return np.asarray(logits)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
  config, params, tokens, ref = load(name)
  ours = forward(config, params, tokens)
  err = np.abs(ours - ref).max()
  print(f"{name}: max |ours - HF| = {err:.2e} (logits std {ref.std():.2f})")
  assert err < TOL, err
  assert ref.std() > 1.0  # the fixture is not trivially small


def test_fixtures_exercise_the_features():
  c1, _, _, _ = load("gemma1_mqa")
  c1h, _, _, _ = load("gemma1_mha")
  c2, _, t2, _ = load("gemma2")
  c3, _, t3, _ = load("gemma3")
  assert c1.num_kv_heads == 1 and c1h.num_kv_heads == c1h.num_heads and 1 < c2.num_kv_heads < c2.num_heads
  for c in (c1, c1h, c2, c3):
    assert c.head_dim * c.num_heads != c.embed_dim
  assert c2.query_pre_attn_scalar != c2.head_dim and c3.query_pre_attn_scalar != c3.head_dim
  assert t2.shape[1] > 2 * c2.sliding_window_size and t3.shape[1] > 2 * c3.sliding_window_size
  assert c3.global_scale_factor == 8.0 and c3.local_base_frequency != c3.global_base_frequency
  assert "local" in [t.value for t in c3.attention_types] and "global" in [t.value for t in c3.attention_types]
  c4, p4, t4, _ = load("gemma4")
  c4kv, p4kv, _, _ = load("gemma4_kv")
  assert c4.family == "gemma4" and c4.head_dim_of(AttentionType.GLOBAL) == 2 * c4.head_dim
  assert c4.global_rope_fraction == 0.25 and not c4.norm_plus_one and c4.query_scale == 1.0
  assert t4.shape[1] > 2 * c4.sliding_window_size and c4.attention_types[-1] == AttentionType.GLOBAL
  assert c4kv.global_k_eq_v and c4kv.kv_heads_of(AttentionType.GLOBAL) == 1 < c4kv.num_kv_heads
  assert "k_einsum" in p4kv["layer_5"]["attn"] and "kv_einsum" in p4kv["layer_0"]["attn"]
  scalars = [float(p4[f"layer_{i}"]["layer_scalar"][0]) for i in range(c4.num_layers)]
  assert min(scalars) < 0.9 and max(scalars) > 1.1  # the fixture's scalars are not all 1
  ce, pe, _, _ = load("gemma4_edge")
  assert ce.per_layer_input_dim == 8 and ce.double_wide_shared_mlp
  assert [ce.kv_source(i) for i in range(ce.num_layers)] == [None] * 5 + [2, 4, 2]
  assert "kv_einsum" not in pe["layer_6"]["attn"] and pe["layer_6"]["mlp"]["linear"].shape[0] == 2 * ce.hidden_dim


def test_soft_caps_bite():
  """Raw final logits exceed the cap, and dropping either cap moves the logits far from HF's."""
  config, params, tokens, ref = load("gemma2")
  hidden, _ = Transformer(config).apply({"params": params}, tokens, return_hidden=True)
  raw = np.asarray(jnp.einsum("BTD,VD->BTV", hidden, params["embedder"]["input_embedding"]))
  assert (np.abs(raw) > config.final_logit_soft_cap).mean() > 0.1
  assert np.abs(ref).max() <= config.final_logit_soft_cap
  for field in ("attn_logits_soft_cap", "final_logit_soft_cap"):
    uncapped = forward(config.replace(**{field: None}), params, tokens)
    assert np.abs(uncapped - ref).max() > 0.5, field


def test_global_rope_scaling_matters():
  config, params, tokens, ref = load("gemma3")
  wrong = forward(config.replace(global_scale_factor=1.0), params, tokens)
  assert np.abs(wrong - ref).max() > 1e-2


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_rows_alone(name, side):
  """Row 1 shortened to n tokens and padded (left or right) in a batch: its logits equal HF's on the prefix."""
  config, params, tokens, ref = load(name)
  T = tokens.shape[1]
  n = T - 11
  row = tokens[1, :n]
  pad = np.zeros(T - n, np.int32)
  padded = np.concatenate([pad, row]) if side == "left" else np.concatenate([row, pad])
  mask = np.concatenate([pad.astype(bool), np.ones(n, bool)]) if side == "left" else \
      np.concatenate([np.ones(n, bool), pad.astype(bool)])
  batch = np.stack([tokens[0], padded])
  input_mask = np.stack([np.ones(T, bool), mask])
  ours = forward(config, params, batch, input_mask=input_mask)
  assert np.abs(ours[0] - ref[0]).max() < TOL
  valid = ours[1][mask]
  assert np.abs(valid - ref[1, :n]).max() < TOL  # causal: logits of a prefix are the prefix of the logits


@pytest.mark.parametrize("name", ["gemma1_mqa", "gemma2", "gemma3"])
def test_packed_rows_match_separate_rows(name):
  config, params, tokens, ref = load(name)
  T = tokens.shape[1]
  cut = T - 7  # row 1 shortened so the packed row also has padding at its end
  packed = np.concatenate([tokens[0], tokens[1, :cut], np.zeros(T - cut, np.int32)])[None]
  segment_ids = np.concatenate([np.full(T, 1), np.full(cut, 2), np.zeros(T - cut)]).astype(np.int32)[None]
  positions = np.concatenate([np.arange(T), np.arange(cut), np.zeros(T - cut)]).astype(np.int32)[None]
  input_mask = segment_ids > 0
  ours = forward(config, params, packed, positions=positions, segment_ids=segment_ids, input_mask=input_mask)[0]
  assert np.abs(ours[:T] - ref[0]).max() < TOL
  assert np.abs(ours[T:T + cut] - ref[1, :cut]).max() < TOL


@pytest.mark.parametrize("name", ["gemma3", "gemma4", "gemma4_kv", "gemma4_edge", "gemma4_moe"])
def test_prefill_then_cached_decoding_matches_transformers(name):
  """A prefill of 5 tokens, then one token at a time through the KV cache (ring buffers on sliding layers,
  Gemma 4's global layers with their own cache shapes), past twice the window: every position's logits
  equal HF's full-sequence ones."""
  from gemma_jax.model import kv_cache
  config, params, tokens, ref = load(name)
  model = Transformer(config)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  cache = kv_cache.init_cache(config, tokens.shape[0], tokens.shape[1])
  g = AttentionType.GLOBAL
  want_shape = (tokens.shape[0], tokens.shape[1], config.kv_heads_of(g), config.head_dim_of(g))
  assert cache[f"layer_{config.attention_types.index(g)}"]["k"].shape == want_shape
  assert len(cache) == config.num_layers - config.num_kv_shared_layers  # KV-shared layers hold none
  logits, cache = step(params, tokens[:, :5], cache)
  outs = [np.asarray(logits)]
  for i in range(5, tokens.shape[1]):
    logits, cache = step(params, tokens[:, i:i + 1], cache)
    outs.append(np.asarray(logits))
  err = np.abs(np.concatenate(outs, axis=1) - ref).max()
  assert tokens.shape[1] > 2 * config.sliding_window_size and err < TOL, err
