"""User-facing errors: one clear line, no traceback.

Library code raises `UserError` (or a subclass) for anything the user can fix: a bad config field, a file
that is not a checkpoint, a malformed record. Scripts catch it and print `error: <message>` with exit
status 1 (see `run_main`). Bugs stay ordinary exceptions with their tracebacks.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
  """A problem with the user's input. The message names the file/field and what to do."""


class ConfigError(UserError):
  """An invalid model or run configuration."""


class CheckpointError(UserError):
  """A checkpoint that cannot be read, converted or written."""


class DataError(UserError):
  """A dataset that cannot be read or validated."""


class Interrupted(BaseException):
  """SIGINT / SIGTERM reached a program outside the places where it saves and stops cleanly.

  A BaseException, like KeyboardInterrupt, so that `except Exception` never swallows it.
  """

  def __init__(self, signum: int, message: str = ""):
    import signal
    self.signum = signum
    super().__init__(message or f"interrupted by {signal.Signals(signum).name}")


def fail(message: str, status: int = 1) -> NoReturn:
  """Prints `error: message` to stderr and exits with `status`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(status)


def run_main(main: Callable[..., object], *args, **kwargs) -> object:
  """Runs `main`; a `UserError` becomes a one-line message and exit status 1, an interrupt one line and 128 + signal."""
  try:
    return main(*args, **kwargs)
  except UserError as e:
    fail(str(e))
  except Interrupted as e:
    fail(str(e), 128 + e.signum)
  except KeyboardInterrupt:
    fail("interrupted (Ctrl-C)", 130)
