"""Model core: configs and presets, masks, RoPE, the KV cache, dtype policy, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from gemma_jax.errors import ConfigError
from gemma_jax.model import kv_cache
from gemma_jax.model.attention import attention_mask
from gemma_jax.model.config import AttentionType, TransformerConfig, preset_names
from gemma_jax.model.params import count_params, init_params, param_shapes
from gemma_jax.model.rope import apply_rope
from gemma_jax.model.layers import Embedder, tied_logits
from gemma_jax.model.transformer import Transformer, logits_from_hidden

# (name, billions of parameters as published, rounded)
PRESET_SIZES = {"gemma1-2b": 2.5, "gemma1-7b": 8.5, "gemma2-2b": 2.6, "gemma2-9b": 9.2, "gemma2-27b": 27.2,
                "gemma3-270m": 0.27, "gemma3-1b": 1.0, "gemma3-4b": 3.9, "gemma3-12b": 11.8, "gemma3-27b": 27.0}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_eval_shape(name):
  config = TransformerConfig.from_preset(name)
  shapes = param_shapes(config)
  n = count_params(shapes) / 1e9
  assert n == pytest.approx(PRESET_SIZES[name], rel=0.05)
  logits = jax.eval_shape(lambda p, t: Transformer(config).apply({"params": p}, t)[0], shapes,
                          jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert logits.shape == (2, 16, config.vocab_size) and logits.dtype == jnp.float32


def test_preset_numbers():
  c = TransformerConfig.gemma2_27b()
  assert c.query_scale == pytest.approx(144 ** -0.5)
  assert c.attention_types[:2] == (AttentionType.LOCAL, AttentionType.GLOBAL)
  c = TransformerConfig.gemma3_270m()
  assert c.attention_types[:6] == (AttentionType.LOCAL,) * 5 + (AttentionType.GLOBAL,)
  assert c.attention_types[17] == AttentionType.GLOBAL and c.sliding_window_size == 512
  assert TransformerConfig.gemma3_4b().global_scale_factor == 8.0
  assert TransformerConfig.gemma1_7b().num_kv_heads == 16
  # A remainder of the Gemma 3 pattern takes the pattern's prefix: 26 layers = 4 x 6 + (local, local).
  assert TransformerConfig.gemma3_1b().attention_types[24:] == (AttentionType.LOCAL,) * 2


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(sliding_window_size=0), "sliding_window_size"),
    (dict(sliding_window_size=None), "sliding_window_size"),
    (dict(dtype="float8"), "dtype"),
    (dict(head_dim=15), "head_dim"),
    (dict(attention_types=("global",)), "attention_types"),
])
def test_invalid_configs_name_the_field(overrides, field):
  with pytest.raises(ConfigError, match=field):
    tiny_config("gemma2", **overrides)


def test_unknown_family():
  with pytest.raises(ConfigError, match="family"):
    TransformerConfig(**{**tiny_config("gemma2").to_dict(), "family": "gemma5", "attention_types": ()})


def test_unknown_preset_lists_known():
  with pytest.raises(ConfigError, match="gemma3-270m"):
    TransformerConfig.from_preset("gemma5-1b")


def test_config_dict_round_trip():
  c = tiny_config("gemma3")
  assert TransformerConfig.from_dict(c.to_dict()) == c
  with pytest.raises(ConfigError, match="unknown model config fields"):
    TransformerConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_sliding_window_mask_exact():
  pos = jnp.arange(6)[None]
  got = np.asarray(attention_mask(pos, pos, window=3))[0].astype(int)
  want = np.array([[1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [0, 1, 1, 1, 0, 0],
                   [0, 0, 1, 1, 1, 0],
                   [0, 0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(got, want)


def test_mask_padding_and_segments():
  q = jnp.array([[0, 1, 0, 1]])
  k = jnp.array([[0, 1, 0, -1]])  # last key is padding
  seg = jnp.array([[1, 1, 2, 2]])
  got = np.asarray(attention_mask(q, k, None, seg, seg))[0].astype(int)
  np.testing.assert_array_equal(got, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]])


def test_rope_matches_complex_rotation():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  pos = jnp.arange(5)[None] * 3
  got = apply_rope(x, pos, base_frequency=100.0, scale_factor=2.0)
  # Reference: pairs (x[i], x[i + H/2]) as complex numbers turned by angle pos / 2 / 100^(2i/H).
  z = np.asarray(x[..., :4]) + 1j * np.asarray(x[..., 4:])
  ang = (np.arange(5) * 3 / 2.0)[:, None] / 100.0 ** (np.arange(0, 8, 2) / 8)
  r = z * np.exp(1j * ang)[None, :, None, :]
  np.testing.assert_allclose(np.asarray(got), np.concatenate([r.real, r.imag], -1), atol=1e-5)


@pytest.mark.parametrize("family", ["gemma1", "gemma2", "gemma3", "gemma4"])
def test_cached_decode_equals_full_forward_past_the_window(family):
  config = tiny_config(family)
  params = init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, config.vocab_size)
  model = Transformer(config)
  full, _ = jax.jit(model.apply)({"params": params}, tokens)
  cache = kv_cache.init_cache(config, 2, 32)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  out, cache = step(params, tokens[:, :9], cache)  # a prefill longer than the window (6)
  outs = [out]
  for t in range(9, 20):
    out, cache = step(params, tokens[:, t:t + 1], cache)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-4)
  if family != "gemma1":  # sliding layers keep only a window-sized ring buffer
    assert cache["layer_0"]["k"].shape[1] == config.sliding_window_size


def test_chunked_prefill_on_ring_buffer_with_left_padding():
  """Two chunks on top of a cache, rows left-padded to different lengths, equal the rows alone."""
  config = tiny_config("gemma2")
  params = init_params(config, jax.random.key(0))
  apply = jax.jit(Transformer(config).apply)  # one compile per shape instead of op-by-op dispatch
  a = jax.random.randint(jax.random.key(2), (1, 17), 0, config.vocab_size)
  b = a[:, :12]
  alone_a, _ = apply({"params": params}, a)
  alone_b, _ = apply({"params": params}, b)
  tokens = jnp.concatenate([a, jnp.pad(b, ((0, 0), (5, 0)))], 0)
  mask = jnp.concatenate([jnp.ones((1, 17), bool), jnp.arange(17)[None] >= 5], 0)
  cache = kv_cache.init_cache(config, 2, 32)
  l1, cache = apply({"params": params}, tokens[:, :10], input_mask=mask[:, :10], cache=cache)
  l2, cache = apply({"params": params}, tokens[:, 10:], input_mask=mask[:, 10:], cache=cache)
  got = jnp.concatenate([l1, l2], 1)
  np.testing.assert_allclose(got[0], alone_a[0], atol=1e-4)
  np.testing.assert_allclose(got[1, 5:], alone_b[0], atol=1e-4)


def test_bf16_policy_keeps_softmax_norms_logits_f32():
  config = tiny_config("gemma2", dtype="bfloat16", param_dtype="bfloat16")
  params = init_params(config, jax.random.key(0))
  assert params["embedder"]["input_embedding"].dtype == jnp.bfloat16
  tokens = jnp.arange(12)[None] % config.vocab_size
  logits, _ = jax.jit(Transformer(config).apply)({"params": params}, tokens)
  assert logits.dtype == jnp.float32
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  ref, _ = jax.jit(Transformer(config.replace(dtype="float32", param_dtype="float32")).apply)({"params": f32}, tokens)
  assert float(jnp.max(jnp.abs(logits - ref))) < 0.15  # bf16 rounding only; the cap keeps |logits| <= 3


def test_embedding_scale_rounded_to_compute_dtype():
  """`Embedder.encode` multiplies by sqrt(D) rounded to the compute dtype first (as the reference does): in bf16,
  3 * 59.75 rounds to 179, where 3 * sqrt(3584) = 179.6 rounded once would give 180."""
  config = TransformerConfig.gemma2_2b(dtype="bfloat16", num_layers=1)
  assert float(jnp.asarray(config.embed_dim ** 0.5, jnp.bfloat16)) == 48.0
  assert float(jnp.asarray(3584 ** 0.5, jnp.bfloat16)) == 59.75
  table = {"input_embedding": jnp.full((8, 3584), 3.0, jnp.float32)}
  tokens = jnp.array([[0, 5]])

  def encode(dtype):
    return Embedder(8, 3584, dtype=dtype).apply({"params": table}, tokens, method=Embedder.encode)
  bf16 = encode(jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16 and bf16.shape == (1, 2, 3584)
  assert np.all(np.asarray(bf16, np.float32) == 179.0)
  assert float(jnp.asarray(3 * 3584 ** 0.5, jnp.bfloat16)) == 180.0  # what rounding once would give
  f32 = encode(jnp.float32)
  assert f32.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(f32), np.float32(3.0) * np.float32(3584 ** 0.5))


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_changes_nothing_numerically(remat):
  config = tiny_config("gemma3")
  params = init_params(config, jax.random.key(0))
  tokens = jnp.arange(10)[None]

  def loss(p, c):
    return jnp.mean(Transformer(c).apply({"params": p}, tokens)[0] ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compile per config instead of op-by-op dispatch
  g0 = grad(params, config)
  g1 = grad(params, config.replace(remat=remat))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])  # gemma2: the final soft-cap applies
def test_vocab_major_head_equals_the_head(family):
  """`tied_logits(vocab_major=True)` (the sampler's decode head on XLA) gives the head's numbers."""
  config = tiny_config(family)
  params = init_params(config, jax.random.key(0))
  emb = params["embedder"]["input_embedding"]
  hidden = jax.random.normal(jax.random.key(1), (3, config.embed_dim)) * 4.0
  want = logits_from_hidden(hidden, emb, config)
  got = jax.jit(lambda h, e: tied_logits(h, e, config.final_logit_soft_cap, vocab_major=True))(hidden, emb)
  assert got.shape == want.shape == (3, config.vocab_size) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)  # f32 summation order
