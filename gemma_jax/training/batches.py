"""Batches for the step: A host-local microbatches -> one [A, R_local, ...] array per field -> global arrays.

    host = stack_microbatches([next(it) for _ in range(grad_accum)])   # numpy, this host's rows
    batch = global_batch(host, mesh)                                      # jax.Arrays over all hosts' rows
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from gemma_jax.training import step as step_lib


def stack_microbatches(micro: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """A list of A host-local [R_local, ...] batches -> [A, R_local, ...], right-padded to their longest T.

  Every host pads to the same T: the data iterator sizes each batch by the global batch's longest row.
  """
  t = max(m["tokens"].shape[1] for m in micro)
  return {k: np.stack([_pad_axis(np.asarray(m[k]), t, axis=1) for m in micro]) for k in micro[0]}


def _pad_axis(x: np.ndarray, t: int, axis: int) -> np.ndarray:
  """Right-pads axis `axis` (the token axis) to length t with zeros (False for masks)."""
  if x.ndim <= axis or x.shape[axis] == t:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, t - x.shape[axis])
  return np.pad(x, pad)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local [A, R_local, ...] arrays -> global [A, R_local * processes, ...] arrays on the mesh.

  Process i holds rows [i * R_local, (i + 1) * R_local) of every global batch (the data iterator's split), so
  the global rows are exactly the batch one process would have built alone.
  """
  sharding = step_lib.batch_sharding(mesh)
  out = {}
  for k, x in local.items():
    shape = (x.shape[0], x.shape[1] * jax.process_count(), *x.shape[2:])
    out[k] = jax.make_array_from_process_local_data(sharding, x, shape)
  return out
