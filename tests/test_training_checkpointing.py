"""Run checkpoints: a sharded train state, the data-iterator state and metadata round-trip bitwise; only the
last `keep` steps stay; an interrupted save's leftovers are never restored."""

from __future__ import annotations

import os
import re
import shutil

import jax
import numpy as np
import pytest

from helpers import tiny_config
from gemma_jax import integrity
from gemma_jax.errors import CheckpointError
from gemma_jax.model import ShardingContext, init_params, make_mesh, param_shardings
from gemma_jax.model.params import param_shapes
from gemma_jax.training import checkpointing, optim, state as state_lib
from test_checkpoint import assert_quiet, data_files, fill, flip_bytes, small_filesystem


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


# ---------------------------------------------------------------------------------------------------------
# Damage, resume_step, a full disk


@pytest.fixture(scope="module")
def two_steps(setup, tmp_path_factory):
  """Steps 1 and 2 of a run (sharded state, different values), saved synchronously; and their target."""
  config, tx, shardings, make = setup
  state = make(jax.random.key(2))
  d = str(tmp_path_factory.mktemp("run") / "ck")
  ck = checkpointing.RunCheckpointer(d, every=1, keep=5, async_save=False)
  for s in (1, 2):
    ck.save(s, _perturbed(state, s), {"s": s}, {"note": s})
  ck.close()
  return d, _perturbed(state, 2), state_lib.abstract_state(tx, param_shapes(config), shardings)


def _copy(src: str, tmp_path) -> str:
  dst = str(tmp_path / "ck")
  shutil.copytree(src, dst)
  return dst


def _damaged_message(d: str, step: int) -> str:
  return (f"the run checkpoint of step {step} is damaged; earlier steps in {d}: [1]; resume from step 1 with "
          f"--config.checkpoint.resume_step=1 (later steps are moved to {d}.abandoned/, not deleted)")


def test_checksums_are_saved_and_verified(two_steps, tmp_path, capfd, caplog):
  src, state2, target = two_steps
  d = _copy(src, tmp_path)
  ck = checkpointing.RunCheckpointer(d, every=1)
  restored, _, meta = ck.restore(2, target)
  assert meta == {"step": 2, "note": 2}  # the checksums stay inside
  names = set(integrity.fingerprints(state2))
  assert {"step", "rng", "nonfinite_run", "nonfinite_total", "params/layer_0/attn/q_einsum/w"} <= names
  assert any(n.startswith("opt_state/") and "/mu/" in n for n in names)
  victim = data_files(os.path.join(d, "2", "state"))[0]
  flip_bytes(victim)  # the middle of the largest file: random weights, stored raw by zstd
  with pytest.raises(CheckpointError) as e:
    ck.restore(2, target)
  msg = str(e.value)
  assert re.fullmatch(rf"{d}/2/state: tensor (params|opt_state)/\S+ does not match its saved checksum; "
                      + re.escape(_damaged_message(d, 2)), msg), msg
  damaged, _, _ = ck.restore(2, target, verify=False)
  name = msg.split(": tensor ")[1].split(" ")[0]
  assert not np.array_equal(np.asarray(integrity.fingerprints(damaged)[name]),
                            integrity.fingerprints(state2)[name])
  ck.close()
  ck = checkpointing.RunCheckpointer(d, every=1, verify=False)  # the constructor's default
  ck.restore(2, target)
  ck.close()
  assert_quiet(capfd, caplog)


@pytest.mark.parametrize("damage", ["zstd_header", "truncated"])
def test_unreadable_step_is_one_line(two_steps, tmp_path, damage, capfd, caplog):
  src, _, target = two_steps
  d = _copy(src, tmp_path)
  victim = data_files(os.path.join(d, "2", "state"))[0]
  if damage == "truncated":
    os.truncate(victim, os.path.getsize(victim) // 2)
  else:  # run checkpoints are zstd-compressed: tensorstore fails to decompress
    with open(victim, "r+b") as f:
      f.seek(4)
      f.write(b"\xff\xff\xff\xff")
  ck = checkpointing.RunCheckpointer(d, every=1)
  with pytest.raises(CheckpointError) as e:
    ck.restore(2, target)
  msg = str(e.value)
  assert msg.startswith(f"{d}/2: cannot restore the run state (") and "\n" not in msg, msg
  assert msg.endswith(_damaged_message(d, 2)) and "TensorStore" not in msg and len(msg) < 800, msg
  if damage == "zstd_header":
    assert "ZSTD" in msg
  ck.close()
  assert_quiet(capfd, caplog)


def test_resume_step_moves_later_steps_aside(two_steps, tmp_path):
  src, _, target = two_steps
  d = _copy(src, tmp_path)
  with pytest.raises(CheckpointError, match=rf"^checkpoint.resume_step=5: there is no run checkpoint of step 5 in "
                     rf"{d}; the saved steps are \[1, 2\]$"):
    checkpointing.RunCheckpointer(d, every=1, resume_step=5)
  ck = checkpointing.RunCheckpointer(d, every=1, resume_step=1)
  assert ck.abandoned == {2: f"{d}.abandoned/2"}
  assert ck.latest_step() == 1 and ck.all_steps() == [1]
  restored, data_state, meta = ck.restore(1, target)
  assert data_state == {"s": 1} and int(restored.step) == 1 and meta["note"] == 1
  ck.close()
  assert os.listdir(f"{d}.abandoned/2") and sorted(os.listdir(d)) == ["1"]  # moved, whole, not deleted
  shutil.copytree(f"{d}.abandoned/2", f"{d}/2")  # it comes back and is abandoned again: both are kept
  ck = checkpointing.RunCheckpointer(d, every=1, resume_step=1)
  assert ck.abandoned == {2: f"{d}.abandoned/2-1"} and sorted(os.listdir(f"{d}.abandoned")) == ["2", "2-1"]
  ck.close()
  ck = checkpointing.RunCheckpointer(d, every=1, resume_step=1)  # nothing later: nothing moves
  assert ck.abandoned == {} and ck.latest_step() == 1
  ck.close()


@pytest.mark.parametrize("surfaces_at", ["wait", "next_save"])
def test_disk_full_async_save_is_one_line(setup, tmp_path, surfaces_at, capfd, caplog):
  config, tx, shardings, make = setup
  state = make(jax.random.key(3))
  with small_filesystem(tmp_path / "fs") as fs:
    d = os.path.join(fs, "ck")
    ck = checkpointing.RunCheckpointer(d, every=1, keep=5, async_save=True)
    assert ck.save(1, state, {"s": 1}, {})
    ck.wait()
    fill(fs, leave_kb=100)  # a step takes ~400 KB
    ck.save(2, _perturbed(state, 2), {"s": 2}, {})  # returns: the files are written in the background
    with pytest.raises(CheckpointError) as e:
      if surfaces_at == "wait":
        ck.wait()
      else:
        ck.save(3, _perturbed(state, 3), {"s": 3}, {})
    msg = str(e.value)
    # Which write fails first (an array's, or a JSON item's without a file name) depends on timing.
    assert re.fullmatch(rf"saving the run checkpoint of step 2 in {d} failed: No space left on device"
                        r"( \([^;]+\))?; its partial files were removed; the earlier checkpoints \[1\] are intact; "
                        r"free some space and run the same command to resume", msg), msg
    ck.wait()  # reported once: the loop's `finally: wait()` does not raise it again
    ck.close()
    assert sorted(os.listdir(d)) == ["1"], [os.path.join(r, f) for r, ds, fs in os.walk(d) for f in fs + ds if "/1" not in r]
    os.remove(os.path.join(fs, "filler"))
    ck = checkpointing.RunCheckpointer(d, every=1)
    assert ck.latest_step() == 1
    restored, data_state, _ = ck.restore(1, state_lib.abstract_state(tx, param_shapes(config), shardings))
    assert data_state == {"s": 1}
    ck.close()
  assert_quiet(capfd, caplog)
