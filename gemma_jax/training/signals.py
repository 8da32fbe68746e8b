"""SIGTERM / SIGINT during training: stop at a step boundary with nothing lost, and never hang.

Inside `deferred()` (the step, its logging and its checkpoint) a signal only sets a flag, which the loop checks
after the step; elsewhere (reading data, evaluating, setting up) it raises `Interrupted` at once, and the loop
saves the last finished step before stopping. A second signal always raises at once.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

import jax
import numpy as np

from gemma_jax.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalCatcher:
  """Installs handlers for SIGTERM and SIGINT while entered (main thread only; elsewhere it does nothing)."""

  def __init__(self):
    self.caught: int | None = None
    self._deferred = False
    self._old = {}

  def __enter__(self):
    for sig in SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def _handle(self, signum, frame):
    if self.caught is not None or not self._deferred:
      raise Interrupted(signum)
    self.caught = signum

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """A region a signal does not interrupt: it is noted, and `any_caught` reports it afterwards."""
    previous, self._deferred = self._deferred, True
    try:
      yield
    finally:
      self._deferred = previous

  def any_caught(self) -> bool:
    """True if a signal reached any process (a collective on multi-host runs)."""
    flag = self.caught is not None
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
