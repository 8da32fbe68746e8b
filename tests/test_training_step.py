"""The jitted train step: sharded == unsharded reference, gradient accumulation, non-finite skipping,
donation, bf16 compute over f32 master weights, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from helpers import tiny_config
from gemma_jax.model import ShardingContext, Transformer, init_params, make_mesh, param_shardings
from gemma_jax.model.params import param_shapes
from gemma_jax.training import optim, state as state_lib, step as step_lib
from gemma_jax.training.orpo import orpo_loss
from gemma_jax.training.sft import sft_loss

B, T = 8, 12  # pairs per microbatch, tokens per row


def pref_batch(rng, pairs=B, t=T, vocab=128):
  """A preference microbatch [2B, T] (chosen rows, then rejected): prompts of 3-5 tokens, right padding."""
  tokens = rng.integers(4, vocab, (2, pairs, t)).astype(np.int32)
  input_mask = np.zeros((2, pairs, t), bool)
  target_mask = np.zeros((2, pairs, t), bool)
  for i in range(pairs):
    prompt = rng.integers(3, 6)
    tokens[1, i, :prompt] = tokens[0, i, :prompt]  # chosen and rejected share the prompt
    for g in range(2):
      n = prompt + rng.integers(2, t - prompt + 1)
      input_mask[g, i, :n] = True
      target_mask[g, i, prompt:n] = True
  tokens = np.where(input_mask, tokens, 0)
  nll_mask = input_mask.copy()
  nll_mask[:, :, 0] = False
  nll_mask[1] = False
  batch = {"tokens": tokens, "input_mask": input_mask, "target_mask": target_mask, "nll_mask": nll_mask}
  return {k: v.reshape(2 * pairs, t) for k, v in batch.items()}


def stack(*mbs):
  return {k: np.stack([m[k] for m in mbs]) for k in mbs[0]}


@pytest.fixture(scope="module")
def setup():
  config = tiny_config("gemma3", num_layers=2)
  mesh = make_mesh("fsdp:4,tensor:2")
  ctx = ShardingContext(mesh)
  # Plain SGD after clipping: updates are linear in the gradients, so comparisons are tight (AdamW's own
  # numerics are tested in test_training_optim.py).
  sched = optim.make_schedule(lr=0.5, schedule="linear", num_steps=10, warmup=0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(sched))
  shardings = state_lib.state_shardings(tx, param_shapes(config), param_shardings(config, ctx), mesh)
  params = jax.device_get(init_params(config, jax.random.key(0)))
  return config, mesh, ctx, tx, sched, shardings, params


def new_state(setup, params=None):
  config, mesh, ctx, tx, sched, shardings, p0 = setup
  p = p0 if params is None else params
  return jax.jit(lambda p: state_lib.create(p, tx, 0), out_shardings=shardings)(p)


def test_sharded_accumulated_step_matches_unsharded_reference(setup):
  config, mesh, ctx, tx, sched, shardings, params = setup
  rng = np.random.default_rng(0)
  mb1, mb2 = pref_batch(rng), pref_batch(rng)
  model = Transformer(config, ctx)
  loss_fn = lambda p, b, aux: orpo_loss(p, b, model=model, config=config, beta=0.1)
  step = step_lib.jit_train_step(loss_fn=loss_fn, optimizer=tx, schedule=sched, mesh=mesh,
                                 state_shardings=shardings)
  state = new_state(setup)
  assert state.params["layer_0"]["mlp"]["linear"].sharding.spec == P("tensor", "fsdp")
  state, metrics = step(state, stack(mb1, mb2), None)

  # Reference: one device, no mesh, the definition of accumulation (mean of microbatch losses and grads).
  plain = Transformer(config)
  ref_loss = lambda p, mb: orpo_loss(p, mb, model=plain, config=config, beta=0.1)
  ref_grad = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))
  (l1, m1), g1 = ref_grad(params, mb1)
  (l2, m2), g2 = ref_grad(params, mb2)
  grads = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  updates, _ = tx.update(grads, tx.init(params), params)
  want = optax.apply_updates(params, updates)

  np.testing.assert_allclose(float(metrics["loss"]), (float(l1) + float(l2)) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/margins"]),
                             (float(m1["rewards/margins"]) + float(m2["rewards/margins"])) / 2, rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(state.step) == 1 and int(metrics["nonfinite"]) == 0


def test_nonfinite_step_is_skipped_and_counted(setup):
  config, mesh, ctx, tx, sched, shardings, params = setup
  model = Transformer(config, ctx)

  def loss_fn(p, b, aux):
    b = dict(b)
    poison = b.pop("poison")
    loss, m = sft_loss(p, b, model=model, config=config)
    return loss * jnp.mean(poison), m

  step = step_lib.jit_train_step(loss_fn=loss_fn, optimizer=tx, schedule=sched, mesh=mesh,
                                 state_shardings=shardings)
  rng = np.random.default_rng(1)
  mb = pref_batch(rng)
  mb = {k: v[:B] for k, v in mb.items() if k != "nll_mask"}  # an SFT batch
  good = stack({**mb, "poison": np.ones((B,), np.float32)})
  bad = stack({**mb, "poison": np.full((B,), np.nan, np.float32)})

  state = new_state(setup)
  before = jax.device_get(state)
  state, m = step(state, bad, None)
  assert int(m["nonfinite"]) == 1 and int(m["nonfinite_run"]) == 1 and np.isnan(float(m["loss"]))
  after = jax.device_get(state)
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after.params,
                                                                                        after.opt_state))):
    np.testing.assert_array_equal(a, b)  # bitwise untouched
  assert int(after.step) == 1 and int(after.nonfinite_total) == 1
  state, m = step(state, bad, None)
  assert int(m["nonfinite_run"]) == 2
  state, m = step(state, good, None)
  assert int(m["nonfinite"]) == 0 and int(m["nonfinite_run"]) == 0
  assert int(state.nonfinite_total) == 2 and int(state.step) == 3
  assert float(m["learning_rate"]) == pytest.approx(float(sched(0)))  # the schedule counts applied updates only

  # The good step after two skipped ones is exactly the first step of a clean run.
  clean, _ = step(new_state(setup), good, None)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(clean.params))):
    np.testing.assert_array_equal(a, b)


def test_state_buffers_are_donated(setup):
  config, mesh, ctx, tx, sched, shardings, params = setup
  model = Transformer(config, ctx)
  loss_fn = lambda p, b, aux: sft_loss(p, b, model=model, config=config)
  step = step_lib.jit_train_step(loss_fn=loss_fn, optimizer=tx, schedule=sched, mesh=mesh,
                                 state_shardings=shardings)
  mb = pref_batch(np.random.default_rng(2))
  batch = stack({k: v[:B] for k, v in mb.items() if k != "nll_mask"})
  state = new_state(setup)
  old = state.params["layer_0"]["mlp"]["linear"]
  state, _ = step(state, batch, None)
  assert old.is_deleted()


def _one_step(setup, cfg, mb):
  config, mesh, ctx, tx, sched, shardings, params = setup
  model = Transformer(cfg, ctx)
  loss_fn = lambda p, b, aux: sft_loss(p, b, model=model, config=cfg)
  step = step_lib.jit_train_step(loss_fn=loss_fn, optimizer=tx, schedule=sched, mesh=mesh,
                                 state_shardings=shardings)
  state, m = step(new_state(setup), mb, None)
  return float(m["loss"]), jax.device_get(state.params)


@pytest.fixture(scope="module")
def baseline(setup):
  mb = pref_batch(np.random.default_rng(3))
  mb = stack({k: v[:B] for k, v in mb.items() if k != "nll_mask"})
  return mb, _one_step(setup, setup[0], mb)


@pytest.mark.parametrize("overrides,tol", [({"remat": "block"}, 1e-6), ({"dtype": "bfloat16"}, 3e-2)])
def test_remat_and_bf16_compute(setup, baseline, overrides, tol):
  """Remat changes nothing (up to f32 rounding); bf16 compute keeps f32 master weights and a close loss."""
  mb, (l0, p0) = baseline
  l1, p1 = _one_step(setup, setup[0].replace(**overrides), mb)
  np.testing.assert_allclose(l1, l0, rtol=tol)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    assert b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 if tol < 1e-3 else 5e-3)



def test_frozen_parameters_get_no_gradient_no_moments_and_no_update(setup):
  """freeze="embedder": the table is bitwise unchanged and holds no Adam moments; every other leaf takes the
  reference AdamW step (clipped by the norm of their own gradients) without it; the compiled step does less
  work than the full one (no backward pass into the table)."""
  config, mesh, ctx, _, sched, _, params = setup
  # eps 1e-3: Adam's first step is ~lr * sign(g), so a leaf whose gradient is ~0 would compare rounding noise.
  tx, _ = optim.make_optimizer(lr=1e-2, schedule="constant", num_steps=10, weight_decay=0.1, clip_norm=0.05,
                               eps=1e-3)
  trainable = optim.trainable_mask(params, "embedder")
  p_shardings = param_shardings(config, ctx)
  model = Transformer(config, ctx)
  loss_fn = lambda p, b, aux: orpo_loss(p, b, model=model, config=config, beta=0.1)
  mb = stack(pref_batch(np.random.default_rng(3)))

  def run(mask):
    shardings = state_lib.state_shardings(tx, param_shapes(config), p_shardings, mesh, mask)
    step = step_lib.jit_train_step(loss_fn=loss_fn, optimizer=tx, schedule=sched, mesh=mesh,
                                   state_shardings=shardings, donate=False, trainable=mask)
    state = jax.jit(lambda p: state_lib.create(p, tx, 0, mask), out_shardings=shardings)(params)
    flops = step.lower(state, mb, None).compile().cost_analysis()["flops"]
    new, metrics = step(state, mb, None)
    return jax.device_get(new), metrics, flops

  new, metrics, flops = run(trainable)
  _, _, full_flops = run(None)
  plain = Transformer(config)
  mb_one = jax.tree.map(lambda x: x[0], mb)
  grads = jax.jit(jax.grad(lambda p: orpo_loss(p, mb_one, model=plain, config=config, beta=0.1)[0]))(params)
  rest = lambda t: {k: v for k, v in t.items() if k != "embedder"}
  updates, _ = tx.update(rest(grads), tx.init(rest(params)), rest(params))
  want = optax.apply_updates(rest(params), updates)

  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(rest(grads))), rtol=1e-5)
  np.testing.assert_array_equal(new.params["embedder"]["input_embedding"], params["embedder"]["input_embedding"])
  for a, b in zip(jax.tree.leaves(rest(new.params)), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(new.params["layer_0"]["mlp"]["linear"], params["layer_0"]["mlp"]["linear"])
  moments = sum(x.size for x in jax.tree.leaves(new.opt_state))
  assert moments == sum(x.size for x in jax.tree.leaves(tx.init(rest(params))))  # 2 per trainable weight + counts
  assert flops < full_flops
