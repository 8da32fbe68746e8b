"""Integrity of saved tensors: a 64-bit checksum per array, computed where the array lives, and what
orbax / tensorstore failures mean in one line.

    fingerprints(tree)              -> {name: "0123456789abcdef"}  (name: the leaf's "/"-joined tree path)
    first_mismatch(tree, saved)     -> the first name whose fingerprint differs from `saved`, or None
    storage_failure(exc)            -> "No space left on device (writing <file>)" etc., or None for a bug
    with quiet_orbax(): ...         orbax's own ERROR logs (tracebacks of its threads) are dropped: the
                                    failure reaches the caller as an exception and is reported once
    join_orbax_threads()            waits for the other writes of a failed save before cleaning up

Each element's bits (unsigned ints of the dtype's width; two uint32 words for a 64-bit dtype) are widened to
uint32 and summed twice, mod 2^32:

    a = sum_i u_i * (2i + 1)             i: the flat (row-major) position; an odd weight, so flipping any
                                         single bit (a change of +-2^k, k < 32) changes the sum
    b = sum_i fmix32(u_i ^ fmix32(i ^ SEED))   murmur3's finalizer is a bijection, so changing any one element
                                         changes the sum; independent of `a` for multi-element damage

Integer addition mod 2^32 is associative and commutative, so the result is the same for any sharding, device
count or reduction order: the jitted reduction runs on the (possibly sharded, multi-host) arrays themselves
and no host gathers a whole tensor. The fingerprint is `a` then `b`, as 16 hex digits.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import threading
import warnings
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ALGORITHM = "sum32x2-v1"  # stored beside the fingerprints; bump if `_fingerprint` ever changes
SEED = 0x9E3779B9


def path_name(path) -> str:
  """A tree path as "a/b/0/c": dict keys, attribute names and sequence indices joined by "/"."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (same shape; a trailing axis of 2 for 64-bit dtypes)."""
  dt = jnp.dtype(x.dtype)
  if dt == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(dt, jnp.complexfloating):
    raise TypeError(f"checksums of {dt.name} arrays are not supported")
  if jnp.issubdtype(dt, jnp.integer) and jnp.iinfo(dt).bits < 8:  # int4/uint4: the value is the bits
    return lax.bitcast_convert_type(x.astype(jnp.int8), jnp.uint8).astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[dt.itemsize]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
  """uint32[2]: (a, b) of the docstring above."""
  u = _bits(x)
  idx = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):  # the flat index from per-axis iotas: elementwise, so it shards like u
    idx = idx + lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  a = jnp.sum(u * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  b = jnp.sum(_fmix32(u ^ _fmix32(idx ^ jnp.uint32(SEED))), dtype=jnp.uint32)
  return jnp.stack([a, b])


@jax.jit
def _fingerprint_all(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_fingerprint(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def _hex(pair) -> str:
  return f"{int(pair[0]):08x}{int(pair[1]):08x}"


def fingerprints(tree: Any) -> dict[str, str]:
  """{leaf name: 16 hex digits} for every array leaf of `tree` (jax arrays on any sharding, or numpy).

  One jitted call for the whole tree; only the [n, 2] result is fetched. All leaves must live on the same
  devices (one mesh, or one device); numpy leaves go to the default device. Collective on multi-host
  arrays: every process must call it.
  """
  named = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not named:
    return {}
  out = _fingerprint_all([x for _, x in named])
  if out.is_fully_replicated:  # the usual case: this process's copy is all of it, also across hosts
    pairs = np.asarray(out.addressable_data(0))
  else:
    from jax.experimental import multihost_utils
    pairs = np.asarray(multihost_utils.process_allgather(out, tiled=True))
  return {path_name(p): _hex(pair) for (p, _), pair in zip(named, pairs)}


def first_mismatch(tree: Any, saved: Mapping[str, str]) -> str | None:
  """The first leaf name (in tree order) whose fingerprint is not `saved[name]` (a leaf missing from `saved`
  counts as a mismatch), or None when all match."""
  for name, value in fingerprints(tree).items():
    if saved.get(name) != value:
      return name
  return None


# ---------------------------------------------------------------------------------------------------------
# Storage failures

_FILE = re.compile(r'local file "([^"]+)"')
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)")
_SPEC = re.compile(r"\s*\[tensorstore_spec=.*$")
_MAX_REASON = 300


def _chain(e: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  line = _SPEC.sub("", text.splitlines()[0]) if text else type(e).__name__
  return line if len(line) <= _MAX_REASON else line[:_MAX_REASON - 3] + "..."


def storage_failure(e: BaseException) -> str | None:
  """One line saying what went wrong when `e` (or its cause) is a storage failure: an OSError (disk full,
  permissions), a tensorstore error (ValueError "DATA_LOSS: ...": truncated / damaged files), a damaged orbax
  metadata file (JSON). None for anything else: a bug, to be raised as it is.

  orbax wraps tensorstore's errors in bare `Exception`s whose text is a spec dump; the root cause is used.
  """
  chain = _chain(e)
  for x in chain:
    if isinstance(x, OSError) and x.errno:
      where = f" ({x.filename})" if x.filename else ""
      return f"{x.strerror or os.strerror(x.errno)}{where}"
  for x in chain:  # tensorstore reports errno in the text: "... [os_error_code='28']"
    code = _OS_ERROR_CODE.search(str(x))
    if code:
      where = _FILE.findall(str(x))
      verb = "writing" if "rror writing" in str(x) else "reading"
      return f"{os.strerror(int(code.group(1)))}" + (f" ({verb} {where[-1]})" if where else "")
  causes = [x for x in chain if isinstance(x, (OSError, ValueError))]
  return _first_line(causes[-1]) if causes else None


def join_orbax_threads(timeout_s: float = 60.0) -> None:
  """Waits for orbax's background threads: after one write of a save failed, the others may still be
  writing into its temporary directory (which must be removed after them, not before)."""
  for t in threading.enumerate():
    orbax = type(t).__module__.startswith("orbax.") or t.name == "async_save"
    if orbax and t is not threading.current_thread() and t.is_alive():
      try:
        t.join(timeout_s)
      except Exception:  # orbax's threads re-raise their own failure on join: already reported
        pass


_quiet_lock = threading.Lock()
_quiet_depth = 0
_installed = False


def _orbax_leftover(text: str) -> bool:
  """The last words of a failed orbax operation's other reads / writes ("Task exception was never retrieved",
  "Exception ignored in <coroutine _read_array_index_and_device_put>", "Event loop is closed"): they die
  after the failure was raised, some only at interpreter exit, and repeat what the exception says."""
  return "orbax" in text or "OCDBT" in text or "Encountered error while reading" in text


_RERAISED = ("raised an exception", "Failed to run", "Save Finalize thread", "Checkpointer failed")


class _DropOrbaxNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if record.name == "asyncio":
      return not ("never retrieved" in str(record.msg) and _orbax_leftover(record.getMessage()))
    # orbax's logs of failures it then raises (from each thread of the operation we report); others, such
    # as "Failed to remove checkpoint" (swallowed by orbax), stay visible
    return not (_quiet_depth and f"{os.sep}orbax{os.sep}" in record.pathname
                and any(m in str(record.msg) for m in _RERAISED))


def _in_orbax(args) -> bool:
  """Whether an unraisable exception comes from orbax's code (its traceback or its coroutine)."""
  files = [getattr(getattr(args.object, "cr_code", None), "co_filename", "")]
  tb = args.exc_traceback
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return any(f"{os.sep}orbax{os.sep}" in f for f in files)


def _unraisable(previous):
  def hook(args) -> None:
    text = f"{args.object!r} {args.exc_value!r}"
    if _in_orbax(args) or _orbax_leftover(text) or (isinstance(args.exc_value, RuntimeError)
                                                    and "Event loop is closed" in text):
      return
    previous(args)
  return hook


def quiet_enter() -> None:
  """Starts dropping orbax's ERROR logs (see `quiet_orbax`); the first call also installs the (permanent)
  filters of orbax's leftover noise."""
  global _quiet_depth, _installed
  with _quiet_lock:
    if not _installed:
      for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_DropOrbaxNoise())
      sys.unraisablehook = _unraisable(sys.unraisablehook)
      _installed = True
    _quiet_depth += 1


def quiet_exit() -> None:
  global _quiet_depth
  with warnings.catch_warnings():  # let a failed operation's abandoned futures die now, while filtered
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    gc.collect()
  with _quiet_lock:
    _quiet_depth -= 1


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Within: orbax's ERROR log records (with tracebacks, from its background threads) are dropped.

  Only for code that turns every orbax failure into an exception of its own: the failure is then reported
  once, as one line, instead of a traceback per thread.
  """
  quiet_enter()
  try:
    yield
  finally:
    quiet_exit()
