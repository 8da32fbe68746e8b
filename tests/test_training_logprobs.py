"""Chunked log-probs: equal to the full-logits computation (values and gradients), flat memory in V."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from gemma_jax.model.params import init_params
from gemma_jax.model.transformer import Transformer
from gemma_jax.training.logprobs import (chunk_positions, fill_positions, model_logprobs, naive_token_logprobs,
                                         token_logprobs)


def _inputs(r=3, t=11, d=16, v=40, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(k[0], (r, t, d))
  emb = jax.random.normal(k[1], (v, d)) * 0.7
  tokens = jax.random.randint(k[2], (r, t), 0, v)
  cot = jax.random.normal(k[3], (r, t))
  sum_mask = jax.random.bernoulli(k[4], 0.6, (r, t))
  return hidden, emb, tokens, cot, sum_mask


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])  # final soft-cap 3.0 bites / no cap
@pytest.mark.parametrize("chunk_size,save_logits", [(1, False), (3, False), (4, True), (10, False), (None, False),
                                                     (None, True)])
def test_chunked_equals_full_logits(family, chunk_size, save_logits):
  config = tiny_config(family)
  hidden, emb, tokens, cot, sum_mask = _inputs()
  hidden = hidden * 3.0  # so the soft-cap (3.0 in the tiny Gemma 2) saturates on many logits

  def run(fn, h, e):
    out = fn(h, e, tokens, config, logit_sum_mask=sum_mask)
    return jnp.sum(out.logprobs * cot), out

  chunked = lambda *a, **k: token_logprobs(*a, chunk_size=chunk_size, save_logits=save_logits, **k)
  (_, got), g_got = jax.jit(jax.value_and_grad(lambda h, e: run(chunked, h, e), (0, 1), has_aux=True))(hidden, emb)
  (_, want), g_want = jax.jit(jax.value_and_grad(lambda h, e: run(naive_token_logprobs, h, e), (0, 1),
                                                 has_aux=True))(hidden, emb)
  # An independent float64 numpy reference for the values.
  logits = np.einsum("rtd,vd->rtv", np.float64(hidden), np.float64(emb))
  if config.final_logit_soft_cap:
    cap = config.final_logit_soft_cap
    logits = np.tanh(logits / cap) * cap
    assert np.mean(np.abs(logits) > 0.9 * cap) > 0.1
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  lp = np.take_along_axis(logp[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]  # logits at t-1, token t
  expected = np.concatenate([np.zeros((3, 1)), lp], axis=1)
  np.testing.assert_allclose(got.logprobs, expected, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(got.logit_sums, (logits.sum(-1) * np.asarray(sum_mask)).sum(-1), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(want.logprobs, expected, atol=2e-5, rtol=1e-5)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    assert np.abs(b).max() > 1e-2


def test_logit_sums_carry_no_gradient():
  config = tiny_config("gemma2")
  hidden, emb, tokens, _, _ = _inputs()
  g = jax.jit(jax.grad(lambda h: jnp.sum(token_logprobs(h, emb, tokens, config, chunk_size=4).logit_sums)))(hidden)
  assert not np.any(np.asarray(g))


def test_bf16_hidden_close_to_f32():
  config = tiny_config("gemma3")
  hidden, emb, tokens, cot, _ = _inputs()
  f = lambda h, e: jnp.sum(token_logprobs(h, e, tokens, config, chunk_size=4).logprobs * cot)
  g32 = jax.jit(jax.grad(f, (0, 1)))(hidden, emb)
  g16 = jax.jit(jax.grad(f, (0, 1)))(hidden.astype(jnp.bfloat16), emb.astype(jnp.bfloat16))
  assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.bfloat16
  for a, b in zip(g16, g32):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.1, rtol=0.05)


def test_chunk_positions_budget():
  assert chunk_positions(8, 262144, 256 << 20) == 32
  assert chunk_positions(64, 262144, 1 << 20) == 1  # never below one position


def test_fill_positions():
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]], bool)
  np.testing.assert_array_equal(fill_positions(mask), [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])


def test_model_logprobs_match_model_logits():
  config = tiny_config("gemma3")
  params = init_params(config, jax.random.key(1))
  model = Transformer(config)
  tokens = jax.random.randint(jax.random.key(2), (4, 13), 1, config.vocab_size)
  lengths = jnp.array([13, 9, 5, 11])
  mask = jnp.arange(13)[None] < lengths[:, None]
  tokens = jnp.where(mask, tokens, 0)
  out = jax.jit(lambda p: model_logprobs(p, {"tokens": tokens, "input_mask": mask}, model=model, chunk_size=4))(params)
  logits, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, input_mask=mask))(params)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
  real = np.asarray(mask[:, 1:])
  np.testing.assert_allclose(np.asarray(out.logprobs[:, 1:])[real], np.asarray(lp)[real], atol=2e-5)


def _compiled_temp_bytes(vocab: int, naive: bool, r=4, t=64, d=32, budget=1 << 20, save_logits=False,
                         max_saved_bytes=0) -> tuple[int, int]:
  config = tiny_config("gemma2", vocab_size=vocab, embed_dim=d)
  fn = naive_token_logprobs if naive else (lambda *a: token_logprobs(
      *a, max_chunk_bytes=budget, save_logits=save_logits, max_saved_bytes=max_saved_bytes))
  step = jax.jit(jax.value_and_grad(lambda h, e, y: jnp.sum(fn(h, e, y, config).logprobs), (0, 1)))
  compiled = step.lower(jax.ShapeDtypeStruct((r, t, d), jnp.float32), jax.ShapeDtypeStruct((vocab, d), jnp.float32),
                        jax.ShapeDtypeStruct((r, t), jnp.int32)).compile()
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes, vocab * d * 4  # and the bytes of one [V, D] f32 table (the gradient's size)


def test_peak_memory_flat_in_vocab():
  """Compiled forward + backward: the naive temp memory grows with R*T*V, the chunked one stays at the
  chunk budget plus one [V, D] gradient accumulator (the size of the embedding gradient itself)."""
  r, t, budget = 4, 64, 1 << 20
  small, large = 4096, 65536
  naive_small, _ = _compiled_temp_bytes(small, True)
  naive_large, _ = _compiled_temp_bytes(large, True)
  chunk_small, table_small = _compiled_temp_bytes(small, False)
  chunk_large, table_large = _compiled_temp_bytes(large, False)
  # The naive program holds at least one f32 copy of the logits [R, T - 1, V].
  assert naive_large >= r * (t - 1) * large * 4
  assert naive_large - naive_small >= 0.9 * r * (t - 1) * (large - small) * 4
  # The chunked one: beyond the [V, D] accumulator, a few chunk-sized buffers, whatever V is.
  work_small, work_large = chunk_small - table_small, chunk_large - table_large
  assert work_small <= 8 * budget and work_large <= 8 * budget, (work_small, work_large)
  assert chunk_large < naive_large / 10


def test_logits_are_kept_only_when_they_fit_the_budget():
  """save_logits=None: below `max_saved_bytes` the program holds the logits [R, T - 1, V] (no recompute);
  above it, it stays at the chunk budget."""
  r, t, vocab, budget = 4, 64, 65536, 1 << 20
  logits_bytes = r * (t - 1) * vocab * 4
  kept, table = _compiled_temp_bytes(vocab, False, save_logits=None, max_saved_bytes=logits_bytes)
  chunked, _ = _compiled_temp_bytes(vocab, False, save_logits=None, max_saved_bytes=logits_bytes - 1)
  assert kept - table >= logits_bytes
  assert chunked - table <= 8 * budget, chunked - table


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])  # logit sums: forward head (cap) / h . sum_v E[v]
@pytest.mark.parametrize("chunk_size,save_logits", [(None, True), (2, False)])
def test_target_positions_head_equals_every_position(family, chunk_size, save_logits):
  """With max_targets, the head runs on the target positions only: the same log-probs there (0 elsewhere), the
  same logit sums and the same gradients as the head on every position."""
  config = tiny_config(family)
  hidden, emb, tokens, cot, sum_mask = _inputs(r=4, t=13)
  hidden = hidden * 3.0
  targets = np.zeros((4, 13), bool)
  for row, (start, stop) in enumerate([(5, 9), (2, 7), (9, 13), (3, 4)]):  # at most 5 per row
    targets[row, start:stop] = True
  targets[0, 11] = True  # not contiguous
  kw = dict(logit_sum_mask=sum_mask, chunk_size=chunk_size, save_logits=save_logits)

  def run(h, e, **extra):
    out = token_logprobs(h, e, tokens, config, **kw, **extra)
    return jnp.sum(out.logprobs * cot * targets), out

  (_, full), g_full = jax.jit(jax.value_and_grad(run, (0, 1), has_aux=True))(hidden, emb)
  (_, sel), g_sel = jax.jit(jax.value_and_grad(
      lambda h, e: run(h, e, targets=targets, max_targets=5), (0, 1), has_aux=True))(hidden, emb)
  np.testing.assert_allclose(sel.logprobs, np.where(targets, full.logprobs, 0.0), atol=1e-6, rtol=1e-6)
  assert np.all(np.asarray(sel.logprobs)[targets] < 0)
  np.testing.assert_allclose(sel.logit_sums, full.logit_sums, rtol=1e-5, atol=1e-4)
  for a, b in zip(g_sel, g_full):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert np.abs(b).max() > 1e-2
  # A bound that is too small is never a silently wrong loss.
  over = jax.jit(lambda h, e: token_logprobs(h, e, tokens, config, targets=targets, max_targets=4).logprobs)
  assert np.all(np.isnan(over(hidden, emb))[:, 1:])  # every log-prob (position 0 predicts nothing: 0)
