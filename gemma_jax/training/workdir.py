"""The work directory of a run: checked before any work, held by one run at a time, left clean when refused.

    with Workdir.open("/runs/orpo1") as wd:     # checks, creates, locks (process 0), removes leftovers
      ...                                       # a UserError here removes a directory this run created
      wd.write_config(config)                  # only once the run has been accepted

The lock is `run.lock`, an `fcntl.flock` held by process 0 for the whole run (one holder per run, however
many hosts), with the holder's pid, host, start time and command inside for the message a second run gets.
The kernel releases a flock when its process dies, so the lock of a killed run (kill -9, a lost host) is
stale by construction: the next run takes it and says whose it was.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from gemma_jax.errors import ConfigError, UserError

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"


def _holder() -> dict[str, Any]:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)[:500]}


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "holder unknown"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
          f"{holder.get('command')}")


def _read_holder(fd: int) -> dict[str, Any]:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    holder = json.loads(data) if data.strip() else {}
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError, RecursionError):
    return {}


class WorkdirLock:
  """An exclusive, non-blocking flock on `<workdir>/run.lock`; `acquire` says whose stale lock it took over."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> dict[str, Any]:
    """Takes the lock; returns the holder of a stale lock it replaced ({} if none). ConfigError if held."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ConfigError(f"{self.path}: cannot create the run lock ({e.strerror})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise ConfigError(f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); wait "
                          "for it to end, or give this run another --workdir") from None
      raise ConfigError(f"{self.path}: cannot lock the work directory ({e.strerror})") from None
    stale = _read_holder(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_holder()).encode())
    os.fsync(fd)
    self._fd = fd
    return stale

  def release(self) -> None:
    """Empties and unlocks the file (it stays: unlinking a locked file races with the next run's open)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def _agree(ok: bool) -> bool:
  """Process 0's `ok`, on every process (a collective on multi-host runs)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def check_writable_dir(path: str, what: str = "workdir") -> bool:
  """Raises ConfigError unless `path` is (or can be made) a writable directory; True if it exists already."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ConfigError(f"{what} {path} exists and is not a directory; give another path")
  existed = os.path.isdir(path)
  probe_dir = path if existed else os.path.dirname(path) or "."
  while not os.path.isdir(probe_dir):  # the nearest existing ancestor decides whether makedirs can work
    probe_dir = os.path.dirname(probe_dir)
  if not os.access(probe_dir, os.W_OK | os.X_OK):
    raise ConfigError(f"{what} {path}: {probe_dir} is not writable; give a path you can write to")
  return existed


class Workdir:
  """A run's work directory while the run holds it; see the module docstring."""

  def __init__(self, path: str, created: bool, lock: WorkdirLock | None):
    self.path = path
    self.created = created
    self._lock = lock
    self.config_written = False

  @classmethod
  @contextlib.contextmanager
  def open(cls, path: str) -> Iterator["Workdir"]:
    path = os.path.abspath(path)
    primary = jax.process_index() == 0
    error = None
    created, lock = False, None
    if primary:
      try:
        created = not check_writable_dir(path)
        os.makedirs(path, exist_ok=True)
        lock = WorkdirLock(path)
        stale = lock.acquire()
        if stale:
          print(f"took over the lock of a run that ended without releasing it ({_describe(stale)})", flush=True)
      except UserError as e:
        error = e
        if created:
          _remove_if_unused(path)
      except OSError as e:
        error = ConfigError(f"workdir {path}: {e.strerror}")
    if not _agree(error is None):
      raise error if error is not None else ConfigError(f"workdir {path}: process 0 could not take it (see its "
                                                        "error line)")
    wd = cls(path, created, lock)
    try:
      yield wd
    except BaseException:
      if primary and created and not wd.config_written:
        wd._release()
        _remove_if_unused(path)  # a refused run leaves no directory behind
      raise
    finally:
      wd._release()

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    """Writes config.json (atomically) once the run has been accepted: a refused run never overwrites it."""
    if jax.process_index() == 0:
      target = os.path.join(self.path, CONFIG_FILE)
      tmp = target + ".tmp"
      with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
      os.replace(tmp, target)
    self.config_written = True


def _remove_if_unused(path: str) -> None:
  """Removes a directory this run created when it holds nothing but the lock file."""
  try:
    if set(os.listdir(path)) <= {LOCK_FILE}:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, LOCK_FILE))
      os.rmdir(path)
  except OSError:
    pass
