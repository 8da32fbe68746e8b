"""ORPO parity with TRL's ORPOTrainer: loss, every metric and every gradient on a fixed batch, f32.

Fixtures (tiny random HF Gemma 2 and Gemma 3 models, the collated batch TRL saw, TRL's loss / metrics /
gradients) come from `tools/make_trl_fixtures.py`; this test needs neither torch nor TRL.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.convert.hf import read_hf
from gemma_jax.convert.hf_names import params_to_hf
from gemma_jax.model.transformer import Transformer
from gemma_jax.training.orpo import orpo_loss

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "trl")
NAMES = ("gemma2", "gemma3", "gemma4")
TOL = 1e-5


def our_batch(ref_batch: dict[str, np.ndarray], extra_padding: int = 0) -> dict[str, np.ndarray]:
  """TRL's collated halves -> our [2B, T] layout (chosen rows, then rejected), right-padded to
  max(T_chosen, T_rejected) + extra_padding with the pad id 0, as TRL's `concatenated_inputs` pads."""
  t = max(ref_batch["chosen_input_ids"].shape[1], ref_batch["rejected_input_ids"].shape[1]) + extra_padding

  def pad(x, value):
    return np.pad(x, [(0, 0), (0, t - x.shape[1])], constant_values=value)

  ids = np.concatenate([pad(ref_batch[f"{h}_input_ids"], 0) for h in ("chosen", "rejected")])
  mask = np.concatenate([pad(ref_batch[f"{h}_attention_mask"], 0) for h in ("chosen", "rejected")]).astype(bool)
  labels = np.concatenate([pad(ref_batch[f"{h}_labels"], -100) for h in ("chosen", "rejected")])
  target = labels != -100
  target[:, 0] = False
  b = ref_batch["chosen_input_ids"].shape[0]
  nll = mask.copy()
  nll[:, 0] = False
  nll[b:] = False
  return {"tokens": ids.astype(np.int32), "input_mask": mask, "target_mask": target, "nll_mask": nll}


def _load(name):
  d = os.path.join(FIXTURES, name)
  if not os.path.isdir(d):
    pytest.skip(f"{d} missing: run /opt/hfref/bin/python tools/make_trl_fixtures.py")
  imported = read_hf(d, progress=False)
  ref_batch = dict(np.load(os.path.join(d, "batch.npz")))
  ref = dict(np.load(os.path.join(d, "reference.npz")))
  return imported, ref_batch, ref


@pytest.mark.parametrize("extra_padding,chunk_size", [(0, None), (5, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_orpo_matches_trl(name, extra_padding, chunk_size):
  imported, ref_batch, ref = _load(name)
  config = imported.config
  params = jax.tree.map(jnp.asarray, imported.params)
  batch = our_batch(ref_batch, extra_padding)
  model = Transformer(config)
  beta = float(ref["beta"])

  def loss_fn(p):
    return orpo_loss(p, batch, model=model, config=config, beta=beta, chunk_size=chunk_size)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  np.testing.assert_allclose(float(loss), float(ref["loss"]), rtol=TOL, atol=TOL)
  ref_metrics = {k[len("metric/"):]: float(v) for k, v in ref.items() if k.startswith("metric/")}
  assert set(ref_metrics) == set(metrics), sorted(set(ref_metrics) ^ set(metrics))
  for k, v in ref_metrics.items():
    if extra_padding and k.startswith("logits/"):
      # Padding more than a sliding window past a row's end sees no key at all; HF (and we) then attend
      # uniformly over every slot, so those padding logits depend on the padded length: TRL's logits/* is
      # reproduced exactly on TRL's own layout (padded to the longest row), only approximately beyond it.
      # (atol: gemma4's mean logit is ~0.005, where a relative bound says nothing)
      np.testing.assert_allclose(float(metrics[k]), v, rtol=0.1, atol=5e-3, err_msg=k)
      continue
    np.testing.assert_allclose(float(metrics[k]), v, rtol=TOL, atol=TOL, err_msg=k)

  ref_grads = {k[len("grad/"):]: v for k, v in ref.items() if k.startswith("grad/")}
  ours = dict(params_to_hf(config, jax.device_get(grads)))
  # HF holds Gemma 4's layer scalars as buffers (constants, no gradient); ours are parameters (a run that
  # should keep them as HF does sets optim.freeze="layer_scalar").
  scalars = {k for k in ours if k.endswith("layer_scalar")}
  assert bool(scalars) == (config.family == "gemma4") and all(np.abs(ours[k]).max() > 0 for k in scalars)
  ours = {k: v for k, v in ours.items() if k not in scalars}
  assert set(ours) == set(ref_grads), sorted(set(ours) ^ set(ref_grads))
  # TRL's own layout: within TOL. Padded further and chunked, the sums run in another order: within 2 TOL.
  tol = TOL if not extra_padding else 2 * TOL
  worst = 0.0
  for k, g in ref_grads.items():
    scale = max(1.0, float(np.abs(g).max()))
    err = float(np.abs(ours[k] - g).max())
    worst = max(worst, err / scale)
    assert err <= tol * scale, f"{k}: max |ours - TRL| = {err:.3g} (max |TRL| = {np.abs(g).max():.3g})"
  assert any(np.abs(g).max() > 0 for g in ref_grads.values())


def test_response_only_nll_differs_from_trl_default():
  """The flag changes only the NLL term: response-only NLL over chosen targets, computed independently."""
  imported, ref_batch, ref = _load("gemma2")
  config = imported.config
  params = jax.tree.map(jnp.asarray, imported.params)
  batch = our_batch(ref_batch)
  model = Transformer(config)
  beta = float(ref["beta"])
  run = jax.jit(lambda p, target: orpo_loss(p, batch, model=model, config=config, beta=beta, nll_target=target),
                static_argnums=1)
  loss_seq, m_seq = run(params, "sequence")
  loss_resp, m_resp = run(params, "response")
  # Independent reference for the response NLL: full logits, log-softmax, chosen rows' response targets.
  logits, _ = model.apply({"params": params}, batch["tokens"], input_mask=batch["input_mask"])
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1)
  lp = np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
  b = batch["tokens"].shape[0] // 2
  tm = batch["target_mask"][:b, 1:]
  expected = -(lp[:b] * tm).sum() / tm.sum()
  np.testing.assert_allclose(float(m_resp["nll_loss"]), expected, rtol=1e-5)
  assert abs(float(m_resp["nll_loss"]) - float(m_seq["nll_loss"])) > 1e-3
  np.testing.assert_allclose(float(loss_resp) - float(m_resp["nll_loss"]),
                             float(loss_seq) - float(m_seq["nll_loss"]), rtol=1e-5)


def test_orpo_with_lora_matches_trl_and_peft():
  """TRL's ORPOTrainer on a peft model (adapters on every projection, seeded non-zero): the same loss,
  metrics and adapter gradients from our adapters on the frozen base (peft's directory imported)."""
  from gemma_jax.convert.peft import MODULES, read_peft, to_peft
  from gemma_jax.model import lora
  from gemma_jax.model.params import flatten
  imported, ref_batch, ref = _load("gemma3_lora")
  config, adapters = read_peft(os.path.join(FIXTURES, "gemma3_lora", "adapter"), imported.config)
  base = jax.tree.map(jnp.asarray, imported.params)
  batch = our_batch(ref_batch)
  model = Transformer(config)

  def loss_fn(a):
    return orpo_loss(lora.attach(base, a), batch, model=model, config=config, beta=float(ref["beta"]))

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jax.tree.map(jnp.asarray, adapters))
  np.testing.assert_allclose(float(loss), float(ref["loss"]), rtol=TOL, atol=TOL)
  for k, v in ref.items():
    if k.startswith("metric/"):
      np.testing.assert_allclose(float(metrics[k[len("metric/"):]]), float(v), rtol=TOL, atol=TOL, err_msg=k)
  ref_grads = {k[len("grad/"):].replace(".default.", "."): v for k, v in ref.items() if k.startswith("grad/")}
  assert len(ref_grads) == 7 * 2 * config.num_layers  # TRL trained the adapters only
  for name, g in flatten(jax.device_get(grads)).items():
    layer, rest = name.split("/", 1)
    slot, which = rest.rsplit("/", 1)[1][len(lora.PREFIX):].rsplit("_", 1)
    key = f"base_model.model.model.layers.{layer[len('layer_'):]}.{MODULES[slot]}.lora_{which.upper()}.weight"
    theirs = ref_grads.pop(key)
    scale = max(1.0, float(np.abs(theirs).max()))
    assert float(np.abs(to_peft(g, which) - theirs).max()) <= TOL * scale, key
  assert not ref_grads
