"""Writing a directory atomically: build it beside its destination, fsync what matters, rename it into place.

    with staged(path) as tmp:   # tmp = <path>.tmp-XXXXXXXX, made with mkdir's mode (0o777 & ~umask)
      ...write into tmp...      # any exception (Ctrl-C too) removes tmp; nothing appears at `path`
    # now tmp is `path`; a directory that was at `path` was moved aside to <path>.old-XXXXXXXX, then deleted

A killed writer leaves only `<path>.tmp-XXXXXXXX` or `<path>.old-XXXXXXXX` (8 hex digits, `STALE`), which
`checkpoint.remove_stale_temporaries` and the converter's Ctrl-C cleanup recognise. Multi-process writers
(`checkpoint.save`) use the pieces: `random_suffix(shared=True)`, `fsync_write`, `move_into_place`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from typing import Iterator

STALE = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def random_suffix(shared: bool = False) -> str:
  """8 random hex digits; shared=True: the same on every JAX process (all write into one directory)."""
  token = secrets.randbits(31)
  if shared:
    import jax
    if jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils
      token = int(multihost_utils.broadcast_one_to_all(np.int32(token)))
  return f"{token:08x}"


def temp_path(path: str, suffix: str) -> str:
  """Where `path` is built: `<path>.tmp-<suffix>`."""
  return f"{path}.tmp-{suffix}"


def fsync_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` and waits until it is on disk."""
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
  """Makes renames inside directory `path` durable (best effort: some filesystems refuse)."""
  try:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def move_into_place(tmp: str, path: str) -> None:
  """Renames `tmp` to `path`; an existing entry at `path` is moved aside first, then deleted."""
  old = None
  if os.path.lexists(path):
    old = f"{path}.old-{secrets.token_hex(4)}"
    os.rename(path, old)
  try:
    os.rename(tmp, path)
  except BaseException:
    if old is not None:
      os.rename(old, path)  # put the previous copy back
    raise
  fsync_dir(os.path.dirname(path))
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(path: str) -> Iterator[str]:
  """Yields a fresh directory beside `path` (parents made); moved into place on success, removed on error."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # os.mkdir, not tempfile.mkdtemp: the directory becomes `path`, so it gets mkdir's mode, not 0o700.
  tmp = temp_path(path, random_suffix())
  os.mkdir(tmp)
  try:
    yield tmp
    move_into_place(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
