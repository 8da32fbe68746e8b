"""The optimizer: schedules against HF's formulas, the weight-decay mask, AdamW against a numpy reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.training import optim


def hf_lr(kind, step, lr, warmup, total, min_ratio=0.0):
  """HF transformers' LambdaLR multipliers (get_*_schedule_with_warmup), written out independently."""
  if step < warmup:
    return lr * step / max(1, warmup)
  if kind == "cosine":
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
  if kind == "linear":
    return lr * max(0.0, (total - step) / max(1, total - warmup))
  if kind == "inverse_sqrt":
    timescale = warmup or 10_000
    shift = timescale - warmup
    return lr / math.sqrt((step + shift) / timescale)
  return lr


@pytest.mark.parametrize("kind", ["cosine", "linear", "inverse_sqrt", "constant"])
@pytest.mark.parametrize("warmup", [0.0, 0.1, 7])
def test_schedules_match_hf(kind, warmup):
  total, lr = 50, 3e-4
  w = optim.warmup_steps(warmup, total)
  sched = optim.make_schedule(lr=lr, schedule=kind, num_steps=total, warmup=warmup)
  for i in range(total + 3):
    want = hf_lr(kind, min(i, total) if kind != "inverse_sqrt" else i, lr, w, total)
    np.testing.assert_allclose(float(sched(i)), want, rtol=2e-6, atol=lr * 1e-6, err_msg=f"step {i}")


def test_warmup_fraction_rounds_up_and_cosine_floor():
  assert optim.warmup_steps(0.1, 95) == 10  # ceil(9.5), as HF's warmup_ratio
  assert optim.warmup_steps(0.0, 95) == 0
  assert optim.warmup_steps(5, 95) == 5
  sched = optim.make_schedule(lr=1.0, schedule="cosine", num_steps=20, warmup=0, min_lr_ratio=0.1)
  assert float(sched(0)) == pytest.approx(1.0)
  assert float(sched(20)) == pytest.approx(0.1)
  assert float(sched(10)) == pytest.approx(0.55)


def test_bad_settings_are_config_errors():
  with pytest.raises(ConfigError, match="optim.schedule"):
    optim.make_schedule(lr=1.0, schedule="exp", num_steps=10)
  with pytest.raises(ConfigError, match="optim.warmup"):
    optim.warmup_steps(2.5, 10)
  with pytest.raises(ConfigError, match="optim.lr"):
    optim.make_optimizer(lr=0.0, num_steps=10)


def _tree():
  r = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  return {"embedder": {"input_embedding": f(6, 4)},
          "layer_0": {"attn": {"q_einsum": {"w": f(2, 4, 3)}, "_query_norm": {"scale": f(3)}},
                      "pre_attention_norm": {"scale": f(4)}, "mlp": {"linear": f(5, 4)}},
          "final_norm": {"scale": f(4)}}


def test_decay_mask_skips_norms_and_embedding():
  mask = optim.decay_mask(_tree())
  assert mask["embedder"]["input_embedding"] is False
  assert mask["layer_0"]["attn"]["_query_norm"]["scale"] is False
  assert mask["layer_0"]["pre_attention_norm"]["scale"] is False
  assert mask["final_norm"]["scale"] is False
  assert mask["layer_0"]["attn"]["q_einsum"]["w"] is True
  assert mask["layer_0"]["mlp"]["linear"] is True
  assert all(jax.tree.leaves(optim.decay_mask(_tree(), decay_norms_and_embeddings=True)))


def test_adamw_matches_numpy_reference():
  """Three updates: clipping by global norm, Adam with bias correction, decoupled masked decay, the schedule."""
  params = _tree()
  lr, wd, clip, b1, b2, eps = 1e-2, 0.1, 0.5, 0.9, 0.95, 1e-8
  tx, sched = optim.make_optimizer(lr=lr, schedule="linear", num_steps=5, warmup=1, weight_decay=wd, b1=b1,
                                   b2=b2, eps=eps, clip_norm=clip)
  opt_state = tx.init(params)
  mask = optim.decay_mask(params)
  ref = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  m = jax.tree.map(np.zeros_like, ref)
  v = jax.tree.map(np.zeros_like, ref)
  r = np.random.default_rng(1)
  for t in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape) * 3, jnp.float32), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

    g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in jax.tree.leaves(g)))
    scale = min(1.0, clip / norm)
    rate = hf_lr("linear", t, lr, 1, 5)
    leaves, treedef = jax.tree.flatten(ref)
    new = []
    for p, gg, mm, vv, dk in zip(leaves, jax.tree.leaves(g), jax.tree.leaves(m), jax.tree.leaves(v),
                                 jax.tree.leaves(mask)):
      gg = gg * scale
      mm[...] = b1 * mm + (1 - b1) * gg
      vv[...] = b2 * vv + (1 - b2) * gg * gg
      mhat = mm / (1 - b1 ** (t + 1))
      vhat = vv / (1 - b2 ** (t + 1))
      upd = mhat / (np.sqrt(vhat) + eps) + (wd * p if dk else 0.0)
      new.append(p - rate * upd)
    ref = jax.tree.unflatten(treedef, new)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
  assert float(sched(0)) == 0.0  # the first update of a warmed-up run has lr 0, as in HF


def test_freeze_patterns_mask_paths_and_mistakes_are_config_errors():
  mask = optim.trainable_mask(_tree(), "embedder, layer_0/mlp")
  assert mask["embedder"]["input_embedding"] is False and mask["layer_0"]["mlp"]["linear"] is False
  assert mask["layer_0"]["attn"]["q_einsum"]["w"] is True and mask["final_norm"]["scale"] is True
  assert optim.trainable_mask(_tree(), " ") is None  # nothing frozen
  with pytest.raises(ConfigError, match=r"optim.freeze: 'embeder' matches no parameter .*embedder/input_embedding"):
    optim.trainable_mask(_tree(), "embeder")
  with pytest.raises(ConfigError, match="optim.freeze: '\\(' is not a regular expression"):
    optim.trainable_mask(_tree(), "(")
  with pytest.raises(ConfigError, match="freezes every parameter"):
    optim.trainable_mask(_tree(), ".")

