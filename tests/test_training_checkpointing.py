"""Run checkpoints: a sharded train state, the data-iterator state and metadata round-trip bitwise; only the
last `keep` steps stay; an interrupted save's leftovers are never restored."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from gemma_jax.errors import CheckpointError
from gemma_jax.model import ShardingContext, init_params, make_mesh, param_shardings
from gemma_jax.model.params import param_shapes
from gemma_jax.training import checkpointing, optim, state as state_lib


@pytest.fixture(scope="module")
def setup():
  config = tiny_config("gemma2", num_layers=2)
  mesh = make_mesh("fsdp:4,tensor:2")
  tx, _ = optim.make_optimizer(lr=1e-3, num_steps=10, weight_decay=0.1)
  shardings = state_lib.state_shardings(tx, param_shapes(config), param_shardings(config, ShardingContext(mesh)),
                                        mesh)
  make = jax.jit(lambda r: state_lib.create(init_params(config, r), tx, 5), out_shardings=shardings)
  return config, tx, shardings, make


def _perturbed(state, k):
  """A state that differs from a fresh one everywhere (moments, counts, step, rng)."""
  bump = lambda x: x + k if np.issubdtype(x.dtype, np.floating) else x + k
  return jax.tree.map(bump, state)


def test_round_trip_is_bitwise_and_keeps_shardings(setup, tmp_path):
  config, tx, shardings, make = setup
  state = _perturbed(make(jax.random.key(0)), 3)
  ck = checkpointing.RunCheckpointer(str(tmp_path / "ck"), every=2, keep=2, async_save=True)
  assert not ck.save(3, state, {"epoch": 0}, {})  # not a multiple of `every`
  assert ck.save(4, state, {"epoch": 1, "position": 8}, {"note": "x"})
  ck.wait()
  target = state_lib.abstract_state(tx, param_shapes(config), shardings)
  restored, data_state, meta = ck.restore(4, target)
  assert data_state == {"epoch": 1, "position": 8}
  assert meta["step"] == 4 and meta["note"] == "x"
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert a.sharding.is_equivalent_to(b, a.ndim)
  ck.close()


def test_keeps_the_last_k_and_ignores_unfinished_saves(setup, tmp_path):
  config, tx, shardings, make = setup
  state = make(jax.random.key(1))
  d = str(tmp_path / "ck")
  ck = checkpointing.RunCheckpointer(d, every=1, keep=2, async_save=False)
  for s in (1, 2, 3):
    ck.save(s, _perturbed(state, s), {"s": s}, {})
  assert ck.all_steps() == [2, 3]
  ck.close()
  # What a process killed in the middle of writing step 4 leaves behind: a temporary directory.
  leftover = os.path.join(d, "4.orbax-checkpoint-tmp-123")
  os.makedirs(os.path.join(leftover, "state"))
  ck = checkpointing.RunCheckpointer(d, every=1, keep=2)
  assert ck.latest_step() == 3 and ck.all_steps() == [2, 3]  # the leftover is never taken for a step
  target = state_lib.abstract_state(tx, param_shapes(config), shardings)
  restored, data_state, _ = ck.restore(3, target)
  assert data_state == {"s": 3} and int(restored.step) == 3
  with pytest.raises(CheckpointError, match="cannot restore"):
    ck.restore(7, target)
  ck.close()
