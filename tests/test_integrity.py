"""Tensor checksums: any single-bit flip changes them, shardings and input kinds do not, values are pinned."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_jax import integrity
from gemma_jax.model import make_mesh


def _fp(x) -> str:
  return integrity.fingerprints({"x": x})["x"]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.uint32, np.int8,
                                   np.uint8, np.bool_])
def test_every_single_bit_flip_changes_the_fingerprint(dtype):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((3, 5)) * 50).astype(dtype)
  bits = x.view(f"u{x.itemsize}").reshape(-1)
  flipped = []
  for pos in range(x.size):  # every element, every bit of its dtype
    for bit in range(1 if dtype == np.bool_ else 8 * x.itemsize):
      y = bits.copy()
      y[pos] ^= np.array(1 << bit, y.dtype)
      flipped.append(y.view(dtype).reshape(x.shape))
  # One vmapped call (a list of hundreds of leaves would take seconds to compile).
  pairs = np.asarray(jax.jit(jax.vmap(integrity._fingerprint))(np.stack(flipped)))
  fps = {integrity._hex(p) for p in pairs}
  assert _fp(x) not in fps
  assert len(fps) == len(flipped)  # distinct from each other too
  assert _fp(flipped[-1]) == integrity._hex(pairs[-1])


def test_swapped_elements_and_scalars_are_seen():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  y = x.copy()
  y[0, 1], y[2, 3] = x[2, 3], x[0, 1]
  assert _fp(x) != _fp(y)
  assert _fp(np.int32(5)) != _fp(np.int32(4))
  assert _fp(jnp.zeros((0, 3))) == "0000000000000000"


def test_same_fingerprint_for_any_sharding_and_for_numpy():
  mesh = make_mesh("fsdp:4,tensor:2")
  x = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
  want = _fp(x)
  for spec in (P(), P("fsdp"), P(None, "tensor"), P("tensor", "fsdp"), P(("fsdp", "tensor"))):
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    assert _fp(sharded) == want, spec
  assert _fp(jax.device_put(x, jax.devices()[3])) == want


def _reference(x: np.ndarray) -> str:
  """The module docstring's definition, in numpy."""
  def fmix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))
  u = x.reshape(-1).view(f"u{x.itemsize}").astype(np.uint32)
  i = np.arange(u.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    a = np.sum(u * (2 * i + 1), dtype=np.uint32)
    b = np.sum(fmix(u ^ fmix(i ^ np.uint32(integrity.SEED))), dtype=np.uint32)
  return f"{int(a):08x}{int(b):08x}"


def test_matches_the_definition_and_pinned_values():
  """Saved checksums must stay readable: a change of the algorithm needs a new ALGORITHM name."""
  x = np.arange(10, dtype=np.float32)
  assert integrity.ALGORITHM == "sum32x2-v1"
  assert _fp(x) == _reference(x) == "07b000005e6e828a"
  assert _fp(x.astype(ml_dtypes.bfloat16)) == _reference(x.astype(ml_dtypes.bfloat16)) == "001907b0a1f66ac9"
  y = np.random.default_rng(2).standard_normal((7, 3, 5)).astype(np.float32)
  assert _fp(y) == _reference(y)


def test_names_and_first_mismatch():
  tree = {"a": {"w": np.ones(3, np.float32)}, "b": [np.zeros(2, np.int32), np.uint32(7)]}
  fps = integrity.fingerprints(tree)
  assert sorted(fps) == ["a/w", "b/0", "b/1"]
  assert integrity.first_mismatch(tree, fps) is None
  damaged = {"a": {"w": np.array([1, 1, 1.0000001], np.float32)}, "b": tree["b"]}
  assert integrity.first_mismatch(damaged, fps) == "a/w"
  assert integrity.first_mismatch(tree, {k: v for k, v in fps.items() if k != "b/1"}) == "b/1"
