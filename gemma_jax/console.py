"""What the scripts print on stderr, and where library logs go instead: one setup for every script.

    console.setup(console.log_path("sample"))    # in main(), after the flags are parsed

The console (stderr) shows our own log records (gemma_jax, sample/, train/) from INFO up, as the bare message
(`warning: ...` for warnings), and library records (orbax, jax, absl) only from WARNING up. Every record from
INFO up, ours and the libraries', goes to the log file in absl's format. `--verbosity=1` (DEBUG) shows the
library records on the console too; `--verbosity=-1` shows warnings only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from gemma_jax import paths

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_PACKAGE)
# Records logged from these directories are ours; everything else is a library's.
OURS = (_PACKAGE + os.sep, os.path.join(_ROOT, "sample") + os.sep, os.path.join(_ROOT, "train") + os.sep)
_BUFFER_LIMIT = 20000  # records held for a log file that is not open yet

_installed: list[logging.Handler] = []


def log_path(script: str) -> str:
  """The log file of a script run outside a work directory: `<cache_dir>/logs/<script>.log` (the last run's)."""
  return os.path.join(paths.cache_dir(), "logs", f"{script}.log")


def is_ours(record: logging.LogRecord) -> bool:
  return os.path.abspath(record.pathname).startswith(OURS)


def _library_formatter() -> logging.Formatter:
  try:
    from absl.logging import PythonFormatter
    return PythonFormatter()
  except ImportError:
    return logging.Formatter("%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s")


class _Console(logging.Handler):
  """stderr (looked up at each record, so that redirecting sys.stderr works); see the module docstring."""

  def __init__(self, level: int, libraries_level: int):
    super().__init__(logging.DEBUG)
    self.ours_level, self.libraries_level = level, libraries_level
    self.library_format = _library_formatter()

  def emit(self, record: logging.LogRecord) -> None:
    try:
      ours = is_ours(record)
      if record.levelno < (self.ours_level if ours else self.libraries_level):
        return
      if ours:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
          msg = f"{'warning' if record.levelno < logging.ERROR else 'error'}: {msg}"
        if record.exc_info:
          msg += "\n" + logging.Formatter().formatException(record.exc_info)
      else:
        msg = self.library_format.format(record)
      sys.stderr.write(msg + "\n")
      sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a broken stderr must not end the run
      self.handleError(record)


class _LogFile(logging.Handler):
  """Appends records to `path` once `ready()` says so (until then they are held in memory; `close` drops
  them if it never did). A file that cannot be written is said once on the console, then ignored."""

  def __init__(self, path: str, level: int, ready: Callable[[], bool] | None, mode: str):
    super().__init__(level)
    self.path, self.ready, self.mode = path, ready, mode
    self.file = None
    self.failed = False
    self.held: list[logging.LogRecord] = []
    self.setFormatter(_library_formatter())

  def _open(self) -> bool:
    try:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self.file = open(self.path, self.mode, encoding="utf-8")
    except OSError as e:
      self.failed = True
      sys.stderr.write(f"warning: cannot write the log file {self.path} ({e.strerror}); library logs are "
                       "dropped\n")
      return False
    for r in self.held:
      self.file.write(self.format(r) + "\n")
    self.held = []
    return True

  def emit(self, record: logging.LogRecord) -> None:
    if self.failed:
      return
    try:
      if self.file is None and (self.ready is not None and not self.ready() or not self._open()):
        if not self.failed and len(self.held) < _BUFFER_LIMIT:
          self.held.append(record)
        return
      self.file.write(self.format(record) + "\n")
      self.file.flush()
    except Exception:  # noqa: BLE001
      self.handleError(record)

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None
    self.held = []
    super().close()


def _verbosity() -> int | None:
  """absl's `--verbosity` when given on the command line, else None."""
  from absl import flags
  try:
    flag = flags.FLAGS["verbosity"]
    return int(flag.value) if flag.present else None
  except (KeyError, flags.Error):
    return None


def setup(log_file: str | None, *, verbosity: int | None = None, ready: Callable[[], bool] | None = None,
          mode: str = "w") -> str | None:
  """Routes logging as the module docstring says; returns the log file's path. Call again to replace.

  log_file: None = no file. ready: the file is opened (and the records so far written) only once it returns
  True (e.g. once a training run holds its work directory). mode: "w" (the last run) or "a" (append).
  verbosity: absl's scale (1 = DEBUG, 0 = INFO, -1 = WARNING); default: `--verbosity` if given, else 0.
  """
  from absl import logging as absl_logging
  if verbosity is None:
    verbosity = _verbosity()
  level = logging.INFO if verbosity is None else absl_logging.converter.absl_to_standard(min(verbosity, 1))
  if verbosity is not None and verbosity > 1:
    level = logging.DEBUG - (verbosity - 1)
  root = logging.getLogger()
  for h in [*_installed, absl_logging.get_absl_handler()]:
    if h in root.handlers:
      root.removeHandler(h)
  for h in _installed:
    h.close()
  _installed.clear()
  libraries_level = level if level < logging.INFO else max(level, logging.WARNING)
  _installed.append(_Console(level, libraries_level))
  if log_file is not None:
    _installed.append(_LogFile(log_file, min(level, logging.INFO), ready, mode))
  for h in _installed:
    root.addHandler(h)
  root.setLevel(min(level, logging.INFO))
  absl_logging.get_absl_logger().setLevel(logging.NOTSET)  # the root's level decides
  return log_file


def written_since(path: str, start: float) -> Callable[[], bool]:
  """A `ready` for `setup`: True once `path` exists with a modification time at or after `start` (time.time())."""
  def ready() -> bool:
    try:
      return os.stat(path).st_mtime >= start - 1.0
    except OSError:
      return False
  return ready
