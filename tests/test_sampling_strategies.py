"""Sampling strategies against a plain numpy reference (penalties, temperature, top-k, top-p, min-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.errors import UserError
from gemma_jax.sampling.strategies import SamplingParams, apply_penalties, filter_and_sample, greedy_argmax

V = 24


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def reference_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
  """HF's order: temperature, top-k, top-p (smallest prefix reaching p), min-p (relative to the best)."""
  x = logits.astype(np.float64) / p.temperature
  keep = np.ones(V, bool)
  order = np.argsort(-x, kind="stable")
  if p.top_k:
    keep[order[p.top_k:]] = False
  if p.top_p < 1:
    probs = _softmax(np.where(keep, x, -np.inf))
    cum = 0.0
    for rank, i in enumerate(order):
      if cum >= p.top_p and rank > 0:
        keep[i] = False
      cum += probs[i]
  if p.min_p > 0:
    probs = _softmax(np.where(keep, x, -np.inf))
    keep &= probs >= p.min_p * probs.max()
  return _softmax(np.where(keep, x, -np.inf))


LOGITS = np.random.default_rng(0).normal(0, 2.0, V).astype(np.float32)


@pytest.mark.parametrize("p", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.8, min_p=0.05),
], ids=["temperature", "top_k", "top_p", "min_p", "all"])
def test_sampled_frequencies_match_reference(p):
  want = reference_probs(LOGITS, p)
  strategy, values = p.strategy(V), p.values()
  n = 20000
  keys = jax.random.split(jax.random.key(p.seed), n)
  draw = jax.jit(jax.vmap(lambda k: filter_and_sample(jnp.asarray(LOGITS)[None], k, strategy, values)[0]))
  counts = np.bincount(np.asarray(draw(keys)), minlength=V) / n
  assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want > 0))  # never outside the filtered set
  np.testing.assert_allclose(counts, want, atol=0.015)


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, V)), jnp.float32)
  p = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)
  assert p.strategy(V).greedy
  got = filter_and_sample(logits, jax.random.key(0), p.strategy(V), p.values())
  assert got.tolist() == np.argmax(np.asarray(logits), -1).tolist()


def test_greedy_argmax_takes_the_first_of_tied_maxima_like_argmax():
  logits = np.zeros((4, V), np.float32)
  logits[0, [3, 7]] = 2.0  # tie: the first wins
  logits[1, V - 1] = 1.0  # the last id
  logits[2, :] = -np.inf
  logits[2, 5] = -1.0  # everything else -inf
  logits[3, :] = 1.0  # all equal: id 0
  got = jax.jit(greedy_argmax)(jnp.asarray(logits))
  assert got.dtype == jnp.int32
  assert got.tolist() == np.argmax(logits, -1).tolist() == [3, V - 1, 5, 0]


def test_top_p_keeps_the_best_token_even_when_it_alone_exceeds_p():
  logits = jnp.asarray([[10.0] + [0.0] * (V - 1)])
  p = SamplingParams(temperature=1.0, top_p=0.1)
  for s in range(20):
    assert int(filter_and_sample(logits, jax.random.key(s), p.strategy(V), p.values())[0]) == 0


def test_penalties_match_reference():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, V)).astype(np.float32)
  seen = rng.random((3, V)) < 0.3
  generated = seen & (rng.random((3, V)) < 0.5)
  p = SamplingParams(temperature=1.0, repetition_penalty=1.7, presence_penalty=0.4)
  got = np.asarray(apply_penalties(jnp.asarray(logits), p.strategy(V), p.values(), jnp.asarray(seen),
                                   jnp.asarray(generated)))
  want = logits.copy()
  for b in range(3):
    for v in range(V):
      if seen[b, v]:  # CTRL / HF: divide positive logits, multiply negative ones
        want[b, v] = want[b, v] / 1.7 if want[b, v] > 0 else want[b, v] * 1.7
      if generated[b, v]:  # OpenAI / vLLM presence: once per generated token
        want[b, v] -= 0.4
  np.testing.assert_allclose(got, want, rtol=1e-6)
  off = SamplingParams()
  assert not off.strategy(V).repetition and not off.strategy(V).presence


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                dict(min_p=1.0), dict(repetition_penalty=0), dict(temperature=NAN),
                                dict(temperature=INF), dict(top_p=NAN), dict(min_p=NAN),
                                dict(repetition_penalty=INF), dict(repetition_penalty=NAN),
                                dict(presence_penalty=NAN), dict(presence_penalty=-INF), dict(seed=2 ** 64),
                                dict(top_k=True)])
def test_bad_params_are_user_errors(kw):
  """NaN and infinities included: NaN passes no comparison, so each check must be one that NaN fails."""
  from gemma_jax.sampling.strategies import SamplingOptionError
  with pytest.raises(SamplingOptionError) as e:
    SamplingParams(**kw)
  (field, value), = kw.items()
  assert e.value.field == field and str(e.value).startswith(f"sampling option {field}={value!r}: ")
  assert isinstance(e.value, UserError)
  SamplingParams(temperature=np.float32(0.7), top_p=np.float32(0.9), presence_penalty=-0.5)  # numpy, negative ok
