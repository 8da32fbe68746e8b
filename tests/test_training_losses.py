"""The objectives against their formulas: hand-computed cases, then each loss end to end on a tiny model
against a float64 numpy computation from the model's full logits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from gemma_jax.errors import ConfigError
from gemma_jax.model.params import init_params
from gemma_jax.model.transformer import Transformer
from gemma_jax.training.dpo import dpo_loss, reference_logps, sigmoid_dpo
from gemma_jax.training.orpo import log1mexp, odds_ratio, orpo_loss
from gemma_jax.training.sft import sft_loss
from gemma_jax.training.simpo import simpo_loss, simpo_losses

# ---------------------------------------------------------------------------------------------------------
# Formulas, by hand


def test_log1mexp_stable_in_f32():
  x = np.array([-1e-7, -1e-4, -0.3, -0.6931, -0.6932, -2.0, -20.0, -80.0], np.float64)
  want = np.where(x < -0.5, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))  # float64: both accurate there
  got = np.asarray(log1mexp(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  # The naive f32 form loses everything near 0 and near -inf; the stable one does not.
  assert np.isfinite(got).all()


def test_odds_ratio_by_hand():
  # a_w = -0.5, a_l = -1: (a_w - a_l) - (log(1 - e^-0.5) - log(1 - e^-1)) = 0.5 + 0.47407698418...
  lo = odds_ratio(jnp.array([-0.5]), jnp.array([-1.0]))
  np.testing.assert_allclose(lo, [0.9740769841801067], rtol=1e-6)
  np.testing.assert_allclose(-jax.nn.log_sigmoid(lo), [0.3202997852375365], rtol=1e-6)
  # a = 0 (a certain response) is clamped to -1e-7: finite, where the unclamped form gives inf.
  assert np.isfinite(odds_ratio(jnp.array([0.0]), jnp.array([-1.0]))).all()


def test_dpo_by_hand():
  # s_w - ref_w = 1, s_l - ref_l = -1, beta 0.1: -logsigmoid(0.2) = log(1 + e^-0.2)
  losses, rw, rl = sigmoid_dpo(jnp.array([-10.0]), jnp.array([-12.0]), jnp.array([-11.0]), jnp.array([-11.0]), 0.1)
  np.testing.assert_allclose(losses, [0.5981388693815918], rtol=1e-6)
  np.testing.assert_allclose(rw, [0.1], rtol=1e-6)
  np.testing.assert_allclose(rl, [-0.1], rtol=1e-6)
  # Label smoothing 0.2: 0.8 * log(1 + e^-0.2) + 0.2 * log(1 + e^0.2)
  losses, _, _ = sigmoid_dpo(jnp.array([-10.0]), jnp.array([-12.0]), jnp.array([-11.0]), jnp.array([-11.0]), 0.1,
                             label_smoothing=0.2)
  np.testing.assert_allclose(losses, [0.8 * 0.5981388693815918 + 0.2 * 0.7981388693815918], rtol=1e-6)


def test_simpo_by_hand():
  # a_w = -1, a_l = -1.5, beta 2, gamma 0.5: -logsigmoid(2 * 0.5 - 0.5) = log(1 + e^-0.5)
  np.testing.assert_allclose(simpo_losses(jnp.array([-1.0]), jnp.array([-1.5]), 2.0, 0.5), [0.4740769841801067],
                             rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# End to end on a tiny model


@functools.lru_cache(maxsize=None)
def _setup(family="gemma2"):
  config = tiny_config(family, num_layers=2)  # the model itself is tested elsewhere; keep compiles short
  params = init_params(config, jax.random.key(0))
  return config, params, Transformer(config)


def preference_batch(vocab, b=3, t=14, seed=0):
  """B pairs, right-padded [2B, T]: BOS + prompt + response (+ pad); each pair shares its prompt."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((2 * b, t), np.int32)
  mask = np.zeros((2 * b, t), bool)
  target = np.zeros((2 * b, t), bool)
  for i in range(b):
    prompt = [2] + list(rng.integers(4, vocab, rng.integers(2, 6)))
    for row in (i, b + i):
      resp = list(rng.integers(4, vocab, rng.integers(1, t - len(prompt)))) + [1]
      seq = (prompt + resp)[:t]
      tokens[row, :len(seq)] = seq
      mask[row, :len(seq)] = True
      target[row, len(prompt):len(seq)] = True
  nll = mask.copy()
  nll[:, 0] = False
  nll[b:] = False
  return {"tokens": tokens, "input_mask": mask, "target_mask": target, "nll_mask": nll}


def full_logprobs(params, model, batch) -> np.ndarray:
  """[R, T] float64: log p(token t | < t) from the model's full logits (0 at t = 0)."""
  logits, _ = jax.jit(lambda p: model.apply({"params": p}, batch["tokens"], input_mask=batch["input_mask"]))(params)
  logits = np.asarray(logits, np.float64)[:, :-1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  lp = np.take_along_axis(logp, batch["tokens"][:, 1:, None].astype(np.int64), -1)[..., 0]
  return np.concatenate([np.zeros((lp.shape[0], 1)), lp], axis=1)


def _logsigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_orpo_against_numpy():
  config, params, model = _setup()
  batch = preference_batch(config.vocab_size)
  beta = 0.3
  loss, m = jax.jit(lambda p: orpo_loss(p, batch, model=model, beta=beta, chunk_size=5))(params)
  lp = full_logprobs(params, model, batch)
  b = 3
  tm = batch["target_mask"]
  avg = (lp * tm).sum(1) / tm.sum(1)
  aw, al = avg[:b], avg[b:]
  log_odds = (aw - al) - (np.log(-np.expm1(aw)) - np.log(-np.expm1(al)))
  nll = -(lp * batch["nll_mask"]).sum() / batch["nll_mask"].sum()
  np.testing.assert_allclose(float(loss), nll - beta * _logsigmoid(log_odds).mean(), rtol=2e-5)
  np.testing.assert_allclose(float(m["nll_loss"]), nll, rtol=2e-5)
  np.testing.assert_allclose(float(m["log_odds_chosen"]), log_odds.mean(), rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(float(m["logps/rejected"]), al.mean(), rtol=2e-5)
  np.testing.assert_allclose(float(m["rewards/margins"]), beta * (aw - al).mean(), rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(float(m["rewards/accuracies"]), np.mean(aw > al), rtol=1e-7)
  # logits/*: every position < longest - 1 of the rows, padding included, over B * (T' - 1) * V.
  logits, _ = jax.jit(lambda p: model.apply({"params": p}, batch["tokens"], input_mask=batch["input_mask"],
                                            positions=jnp.broadcast_to(jnp.arange(14), (6, 14))))(params)
  longest = batch["input_mask"].sum(1).max()
  want = np.asarray(logits, np.float64)[:b, :longest - 1].mean()
  np.testing.assert_allclose(float(m["logits/chosen"]), want, rtol=1e-4, atol=1e-6)
  # The default nll_mask (absent from the batch) is TRL's: every non-pad chosen token but the first.
  no_nll = {k: v for k, v in batch.items() if k != "nll_mask"}
  loss2, _ = jax.jit(lambda p: orpo_loss(p, no_nll, model=model, beta=beta, chunk_size=5))(params)
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


def test_dpo_against_numpy_and_reference_paths():
  config, params, model = _setup()
  ref_params = init_params(config, jax.random.key(7))
  batch = preference_batch(config.vocab_size, seed=1)
  beta = 0.2
  lp, ref_lp = full_logprobs(params, model, batch), full_logprobs(ref_params, model, batch)
  tm = batch["target_mask"]
  s, r = (lp * tm).sum(1), (ref_lp * tm).sum(1)
  z = (s[:3] - r[:3]) - (s[3:] - r[3:])
  want = -_logsigmoid(beta * z).mean()

  precomputed = jax.jit(lambda p: reference_logps(p, batch, model=model))(ref_params)
  np.testing.assert_allclose(precomputed, r, rtol=2e-5)
  with_ref = dict(batch, reference_logps=precomputed)
  loss_a, m_a = jax.jit(lambda p: dpo_loss(p, with_ref, model=model, beta=beta))(params)
  loss_b, m_b = jax.jit(lambda p, q: dpo_loss(p, batch, model=model, beta=beta, reference_params=q))(params,
                                                                                                     ref_params)
  np.testing.assert_allclose(float(loss_a), want, rtol=2e-5)
  np.testing.assert_allclose(float(loss_b), want, rtol=2e-5)
  np.testing.assert_allclose(float(m_a["rewards/chosen"]), beta * (s[:3] - r[:3]).mean(), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(float(m_a["logps/chosen"]), s[:3].mean(), rtol=2e-5)
  # Reference = policy: every implicit reward is 0 and the loss is log 2.
  loss_c, _ = jax.jit(lambda p: dpo_loss(p, batch, model=model, beta=beta, reference_params=p))(params)
  np.testing.assert_allclose(float(loss_c), np.log(2.0), rtol=1e-6)
  # The gradient does not flow into the reference.
  g = jax.jit(jax.grad(lambda q: dpo_loss(params, batch, model=model, beta=beta, reference_params=q)[0]))(ref_params)
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(g))
  with pytest.raises(ConfigError, match="reference"):
    dpo_loss(params, batch, model=model)


def test_simpo_against_numpy():
  config, params, model = _setup("gemma3")
  batch = preference_batch(config.vocab_size, seed=2)
  beta, gamma = 2.5, 0.7
  loss, m = jax.jit(lambda p: simpo_loss(p, batch, model=model, beta=beta, gamma=gamma))(params)
  lp = full_logprobs(params, model, batch)
  tm = batch["target_mask"]
  a = (lp * tm).sum(1) / tm.sum(1)
  want = -_logsigmoid(beta * (a[:3] - a[3:]) - gamma).mean()
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(m["logps/chosen"]), a[:3].mean(), rtol=2e-5)


def test_sft_against_numpy_and_packing():
  config, params, model = _setup("gemma3")
  rng = np.random.default_rng(3)
  seqs = [[2] + list(rng.integers(4, config.vocab_size, 6)), [2] + list(rng.integers(4, config.vocab_size, 8))]
  prompt = [3, 2]  # targets start after this many tokens in each sequence
  t = 16
  # Unpacked: one sequence per row.
  tokens = np.zeros((2, t), np.int32)
  mask = np.zeros((2, t), bool)
  target = np.zeros((2, t), bool)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
    mask[i, :len(s)] = True
    target[i, prompt[i]:len(s)] = True
  plain = {"tokens": tokens, "input_mask": mask, "target_mask": target}
  loss, m = jax.jit(lambda p: sft_loss(p, plain, model=model, chunk_size=3))(params)
  lp = full_logprobs(params, model, plain)
  np.testing.assert_allclose(float(loss), -(lp * target).sum() / target.sum(), rtol=2e-5)
  assert float(m["target_tokens"]) == target.sum()
  # Packed: both sequences in one row, segments 1 and 2, positions restarting; same targets, same loss.
  packed_tokens = np.zeros((1, t), np.int32)
  seg = np.zeros((1, t), np.int32)
  pos = np.zeros((1, t), np.int32)
  ptarget = np.zeros((1, t), bool)
  at = 0
  for i, s in enumerate(seqs):
    packed_tokens[0, at:at + len(s)] = s
    seg[0, at:at + len(s)] = i + 1
    pos[0, at:at + len(s)] = np.arange(len(s))
    ptarget[0, at + prompt[i]:at + len(s)] = True
    at += len(s)
  packed = {"tokens": packed_tokens, "input_mask": seg > 0, "target_mask": ptarget, "segment_ids": seg,
            "positions": pos}
  loss_p, _ = jax.jit(lambda p: sft_loss(p, packed, model=model, chunk_size=3))(params)
  np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-5)
  # The gradients agree too.
  g1 = jax.jit(jax.grad(lambda p: sft_loss(p, plain, model=model)[0]))(params)
  g2 = jax.jit(jax.grad(lambda p: sft_loss(p, packed, model=model)[0]))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["orpo", "sft", "dpo", "simpo"])
def test_the_objectives_table_names_each_loss_and_its_metrics(name):
  """objectives.OBJECTIVES: the loss the loop builds for `name` returns exactly the table's metric names."""
  from gemma_jax.training import objectives
  from gemma_jax.training.run_config import OBJECTIVES, default_config
  assert OBJECTIVES == tuple(objectives.OBJECTIVES) == ("orpo", "sft", "dpo", "simpo")
  config, params, model = _setup()
  c = default_config()
  c.objective = name
  objective = objectives.get(name)
  assert objective.rows_per_example == (1 if name == "sft" else 2)
  loss_fn = objectives.make_loss_fn(c, model, config)
  aux = params if objective.needs_reference else None
  loss, metrics = jax.eval_shape(loss_fn, params, preference_batch(config.vocab_size), aux)
  assert loss.shape == () and sorted(metrics) == sorted(objective.metrics)
  with pytest.raises(ConfigError, match=r"objective='kto': use one of orpo, sft, dpo, simpo"):
    objectives.get("kto")


@pytest.mark.parametrize("name,family", [("orpo", "gemma2"), ("dpo", "gemma3"), ("simpo", "gemma3")])
def test_the_target_positions_head_changes_no_loss_metric_or_gradient(name, family):
  """make_loss_fn with max_targets (what the loop passes: the data's longest response) gives the loss, every
  metric and the gradients of the head on every position; ORPO reads only responses with nll_target="response"
  (with "sequence" it reads every chosen token, so the bound is not used)."""
  from gemma_jax.training import objectives
  from gemma_jax.training.run_config import default_config
  config, params, model = _setup(family)
  c = default_config()
  c.objective = name
  c.loss.nll_target = "response"
  batch = preference_batch(config.vocab_size, t=20, seed=4)
  most = int(batch["target_mask"].sum(1).max())
  assert most < 19  # the bound is below the T - 1 positions, so the target-positions head runs
  # DPO's reference: other weights, so its rewards are not exactly 0 (where float noise would flip accuracies)
  aux = jax.tree.map(lambda x: x * 0.9, params) if objectives.get(name).needs_reference else None

  def run(max_targets):
    loss_fn = objectives.make_loss_fn(c, model, config, max_targets)
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, aux), has_aux=True))(params)

  (loss, metrics), grads = run(None)
  (loss_k, metrics_k), grads_k = run(most)
  np.testing.assert_allclose(float(loss_k), float(loss), rtol=1e-5)
  for k in metrics:
    np.testing.assert_allclose(float(metrics_k[k]), float(metrics[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  (too_small, _), _ = run(most - 1)
  assert np.isnan(float(too_small))
  if name == "orpo":
    c.loss.nll_target = "sequence"  # reads the prompts of the chosen rows: the bound is ignored
    (loss_seq, _), _ = run(most - 1)
    assert np.isfinite(float(loss_seq))
