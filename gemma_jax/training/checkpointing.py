"""Run checkpoints for resuming: the whole train state, the data-iterator state and a little metadata.

    <workdir>/checkpoints/<step>/state   TrainState (params, optimizer state, step, RNG, non-finite counts)
    <workdir>/checkpoints/<step>/data    {"hosts": [iterator state of process 0, 1, ...]} (JSON)
    <workdir>/checkpoints/<step>/meta    {"step", "run": the run config, "model": the model config, ...}

An orbax `CheckpointManager` writes each step into a temporary directory and renames it when complete
(asynchronously by default: the arrays are copied off the devices before `save` returns, the files are
written in the background). A process killed at any moment, even `kill -9` in the middle of a save, leaves
only complete steps behind; the temporary leftovers are removed on the next start. The last `keep` steps
are kept. (The best-by-eval model is written separately, in our checkpoint format, by the loop.)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gemma_jax.errors import CheckpointError
from gemma_jax.training.state import TrainState


def allgather_json(obj: Any) -> list[Any]:
  """The JSON-serializable `obj` of every process, in process order (a list of one on a single host)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(np.asarray(gathered), np.asarray(sizes))]


class RunCheckpointer:
  """Saves every `every` steps (keeping the last `keep`), restores the latest; one per work directory."""

  def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True):
    if every <= 0:
      raise CheckpointError(f"checkpoint.every={every}: must be > 0")
    if keep <= 0:
      raise CheckpointError(f"checkpoint.keep={keep}: must be > 0")
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: Any, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves if `step` is a multiple of `every` (or `force`); returns whether a save started.

    data_state: this process's iterator state; every process's is gathered and saved (a collective: all
    processes must call `save` with the same step).
    """
    if not force and step % self.every:
      return False
    if step in self.manager.all_steps():
      return False
    hosts = allgather_json(data_state)
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"hosts": hosts}),
        meta=ocp.args.JsonSave({"step": int(step), **meta})), force=True)

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, Any, dict[str, Any]]:
    """(state placed as `target`'s shardings, this process's iterator state, meta) of a saved step."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except (FileNotFoundError, ValueError) as e:
      raise CheckpointError(f"{self.directory}/{step}: cannot restore the run state "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); delete that step "
                            "directory to resume from an earlier one") from None
    hosts = out["data"]["hosts"]
    if len(hosts) != jax.process_count():
      raise CheckpointError(f"{self.directory}/{step}: saved by {len(hosts)} processes but {jax.process_count()} "
                            "are running now; resume with the same number of processes")
    return out["state"], hosts[jax.process_index()], out["meta"]

  def wait(self) -> None:
    """Blocks until the pending asynchronous save (if any) is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
