"""Run checkpoints for resuming: the whole train state, the data-iterator state and a little metadata.

    <workdir>/checkpoints/<step>/state   TrainState (params, optimizer state, step, RNG, non-finite counts)
    <workdir>/checkpoints/<step>/data    {"hosts": [iterator state of process 0, 1, ...]} (JSON)
    <workdir>/checkpoints/<step>/meta    {"step", "run": the run config, "model": the model config, ...,
                                          "checksums": {"algorithm", "state": {leaf name: checksum}}}

An orbax `CheckpointManager` writes each step into a temporary directory and renames it when complete
(asynchronously by default: the arrays are copied off the devices before `save` returns, the files are
written in the background). A process killed at any moment, even `kill -9` in the middle of a save, leaves
only complete steps behind; the temporary leftovers are removed on the next start. The last `keep` steps
are kept. (The best-by-eval model is written separately, in our checkpoint format, by the loop.)

Every leaf of the state is checksummed on its devices when saved (`gemma_jax.integrity`) and verified when
restored. A damaged step, or a save that fails (disk full: it surfaces at the next `save`, `wait` or `close`),
is one CheckpointError line naming the step and the earlier ones; `resume_step=M` moves the later steps
aside to `<directory>.abandoned/` (never deletes them) so the run continues from M.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gemma_jax import integrity
from gemma_jax.checkpoint_format import check_writable_path
from gemma_jax.errors import CheckpointError
from gemma_jax.training.state import TrainState

CHECKSUMS = "checksums"  # the meta item's entry holding them


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


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def saved_steps(directory: str) -> list[int]:
  """The complete steps in a run-checkpoint directory (orbax names them by number; temporaries are not)."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def abandon_steps_after(directory: str, resume_step: int) -> dict[int, str]:
  """Moves the steps after `resume_step` to `<directory>.abandoned/<step>` (renamed, never deleted).

  Returns {step: where it went}. A `resume_step` that was not saved is a CheckpointError listing those that
  were. Collective on multi-host runs (process 0 renames).
  """
  steps = saved_steps(directory)
  if resume_step not in steps:
    raise CheckpointError(f"checkpoint.resume_step={resume_step}: there is no run checkpoint of step "
                          f"{resume_step} in {directory}; the saved steps are {steps or 'none'}")
  aside = f"{directory}.abandoned"
  moved = {}
  for step in (s for s in steps if s > resume_step):
    dest, n = os.path.join(aside, str(step)), 1
    while os.path.lexists(dest):  # abandoned before, by an earlier resume: keep both
      dest, n = os.path.join(aside, f"{step}-{n}"), n + 1
    moved[step] = dest
  _sync(f"gemma_jax_abandon_listed:{directory}")
  if jax.process_index() == 0:
    for step, dest in moved.items():
      os.makedirs(aside, exist_ok=True)
      os.rename(os.path.join(directory, str(step)), dest)
  _sync(f"gemma_jax_abandon_done:{directory}")
  return moved


def _remove_settled(pattern: str, settle_s: float = 0.5, limit_s: float = 10.0) -> None:
  """Removes what matches `pattern` until nothing reappears for `settle_s`: tensorstore's writes of a failed
  save (C++ threads) can still create files after the failure was raised."""
  deadline = time.monotonic() + limit_s
  while True:
    for leftover in glob.glob(pattern):
      shutil.rmtree(leftover, ignore_errors=True)
    time.sleep(settle_s)
    if not glob.glob(pattern) or time.monotonic() > deadline:
      return


class RunCheckpointer:
  """Saves every `every` steps (keeping the last `keep`), restores the latest; one per work directory.

  verify: check every restored leaf against its saved checksum (steps saved without checksums restore
  unverified). resume_step: continue from that saved step; later ones are moved to
  `<directory>.abandoned/` first (`self.abandoned`: {step: new path}; log it).
  """

  def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True,
               verify: bool = True, resume_step: int | None = None):
    if every <= 0:
      raise CheckpointError(f"checkpoint.every={every}: must be > 0")
    if keep <= 0:
      raise CheckpointError(f"checkpoint.keep={keep}: must be > 0")
    self.directory = os.path.abspath(directory)
    check_writable_path(self.directory)
    self.every = every
    self.verify = verify
    self.abandoned: dict[int, str] = {}
    if resume_step is not None:
      self.abandoned = abandon_steps_after(self.directory, int(resume_step))
    self._pending: int | None = None  # the step an asynchronous save is still writing
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))
    # Until `close`: orbax logs a traceback per thread of a failed save; we raise the failure, once.
    integrity.quiet_enter()
    self._quiet = True

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: Any, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves if `step` is a multiple of `every` (or `force`); returns whether a save started.

    data_state: this process's iterator state; every process's is gathered and saved (a collective: all
    processes must call `save` with the same step). Raises CheckpointError if this save, or the previous
    asynchronous one, failed.
    """
    if not force and step % self.every:
      return False
    self.wait()  # the previous save's failure is that save's, reported as such
    if step in self.manager.all_steps():
      return False
    sums = integrity.fingerprints(state)
    hosts = allgather_json(data_state)
    self._pending = step
    try:
      started = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave({"hosts": hosts}),
          meta=ocp.args.JsonSave({"step": int(step), **meta,
                                  CHECKSUMS: {"algorithm": integrity.ALGORITHM, "state": sums}})), force=True)
    except Exception as e:
      self._save_failed(e)
    if not started:
      self._pending = None
    return started

  def _save_failed(self, e: Exception) -> None:
    step, self._pending = self._pending, None
    reason = integrity.storage_failure(e)
    if reason is None:
      raise e
    integrity.join_orbax_threads()  # its other writes may still be filling the temporary directory
    if jax.process_index() == 0:  # orbax only cleans its temporaries up on the next start
      _remove_settled(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*"))
    earlier = [s for s in saved_steps(self.directory) if s != step]
    todo = "free some space" if "No space left" in reason else "fix that"
    raise CheckpointError(
        f"saving the run checkpoint of step {step} in {self.directory} failed: {reason}; its partial files were "
        f"removed; the earlier checkpoints {earlier or '(none)'} are intact; {todo} and run the same command to "
        "resume") from None

  def restore(self, step: int, target: TrainState, *,
              verify: bool | None = None) -> tuple[TrainState, Any, dict[str, Any]]:
    """(state placed as `target`'s shardings, this process's iterator state, meta) of a saved step.

    verify: None follows the constructor's `verify`.
    """
    where = os.path.join(self.directory, str(step))
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(f"{where}: cannot restore step {step}: no such run checkpoint (the saved steps are "
                            f"{steps or 'none'})")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises bare Exceptions around tensorstore's ValueErrors
      reason = integrity.storage_failure(e)
      if reason is None:
        raise
      raise CheckpointError(f"{where}: cannot restore the run state ({reason}); {self._damaged(step)}") from None
    meta = dict(out["meta"] or {})
    sums = meta.pop(CHECKSUMS, None)
    if (self.verify if verify is None else verify) and sums is not None:
      if sums.get("algorithm") != integrity.ALGORITHM:
        raise CheckpointError(f"{where}/meta: checksum algorithm {sums.get('algorithm')!r} is unknown to this "
                              f"gemma_jax (it writes {integrity.ALGORITHM!r}); upgrade gemma_jax")
      bad = integrity.first_mismatch(out["state"], sums.get("state") or {})
      if bad is not None:
        raise CheckpointError(f"{where}/state: tensor {bad} does not match its saved checksum; "
                              f"{self._damaged(step)}")
    hosts = out["data"]["hosts"]
    if len(hosts) != jax.process_count():
      raise CheckpointError(f"{where}: saved by {len(hosts)} processes but {jax.process_count()} are running "
                            "now; resume with the same number of processes")
    return out["state"], hosts[jax.process_index()], meta

  def read_meta(self, step: int) -> dict[str, Any]:
    """The meta item of a saved step (what `save` was given, plus "step"), without reading the state."""
    where = os.path.join(self.directory, str(step))
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(f"{where}: no such run checkpoint (the saved steps are {steps or 'none'})")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
      reason = integrity.storage_failure(e)
      if reason is None:
        raise
      raise CheckpointError(f"{where}/meta: cannot read it ({reason}); {self._damaged(step)}") from None
    meta = out["meta"]
    if not isinstance(meta, dict):
      raise CheckpointError(f"{where}/meta: expected a JSON object, got {type(meta).__name__}; "
                            f"{self._damaged(step)}")
    return {k: v for k, v in meta.items() if k != CHECKSUMS}

  def _damaged(self, step: int) -> str:
    earlier = [s for s in self.all_steps() if s < step]
    if not earlier:
      return (f"the run checkpoint of step {step} is damaged and no earlier step is saved in {self.directory}; "
              "start the run again in a new workdir")
    return (f"the run checkpoint of step {step} is damaged; earlier steps in {self.directory}: {earlier}; resume "
            f"from step {earlier[-1]} with --config.checkpoint.resume_step={earlier[-1]} (later steps are moved "
            f"to {self.directory}.abandoned/, not deleted)")

  def wait(self) -> None:
    """Blocks until the pending asynchronous save (if any) is complete on disk; raises CheckpointError if it
    failed (once: a later call returns)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._save_failed(e)
    self._pending = None

  def close(self) -> None:
    """Waits for the pending save (raising its failure) and closes the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()
      if self._quiet:
        self._quiet = False
        integrity.quiet_exit()
