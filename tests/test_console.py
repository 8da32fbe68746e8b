"""gemma_jax.console: what the scripts print on stderr and what goes to their log file."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_logging():
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  yield
  from gemma_jax import console
  for h in console._installed:
    root.removeHandler(h)
    h.close()
  console._installed.clear()
  root.handlers[:] = handlers
  root.setLevel(level)


def _record(pathname: str, level: int, msg: str) -> logging.LogRecord:
  return logging.LogRecord("absl", level, pathname, 1, msg, (), None)


def _emit(records):
  err = io.StringIO()
  real, sys.stderr = sys.stderr, err
  try:
    for r in records:
      logging.getLogger().handle(r)
  finally:
    sys.stderr = real
  return err.getvalue()


def test_ours_on_the_console_libraries_in_the_file(tmp_path, restore_logging):
  from gemma_jax import console
  ours = os.path.join(os.path.dirname(console.__file__), "sampling", "loading.py")
  lib = "/site-packages/orbax/checkpoint/checkpointer.py"
  records = [_record(ours, logging.INFO, "loaded it"), _record(ours, logging.WARNING, "careful"),
             _record(lib, logging.INFO, "Restoring checkpoint"), _record(lib, logging.WARNING, "disk slow"),
             _record(lib, logging.DEBUG, "details")]
  log = str(tmp_path / "logs" / "x.log")
  console.setup(log, verbosity=0)
  err = _emit(records)
  lines = err.splitlines()
  assert lines[:2] == ["loaded it", "warning: careful"] and len(lines) == 3 and "disk slow" in lines[2]
  text = open(log).read()
  assert "Restoring checkpoint" in text and "loaded it" in text and "details" not in text

  console.setup(log, verbosity=1)  # libraries on the console too
  err = _emit(records)
  assert "Restoring checkpoint" in err and "details" in err
  console.setup(None, verbosity=-1)  # warnings only
  assert _emit(records).splitlines()[0] == "warning: careful"


def test_log_file_waits_until_ready(tmp_path, restore_logging):
  from gemma_jax import console
  log, ready = str(tmp_path / "log.txt"), [False]
  console.setup(log, verbosity=0, ready=lambda: ready[0], mode="a")
  _emit([_record("/lib/x.py", logging.INFO, "early")])
  assert not os.path.exists(log)
  ready[0] = True
  _emit([_record("/lib/x.py", logging.INFO, "late")])
  text = open(log).read()
  assert text.index("early") < text.index("late")


def _run(args, env_extra, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(env_extra)
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env)


@pytest.mark.slow
def test_train_console_and_workdir_log(tiny_tokenizer, tmp_path):
  """A tiny training run: no library INFO lines on the console; they are in <workdir>/log.txt."""
  from training_helpers import cli_args, make_workspace, subprocess_env
  ws = make_workspace(tmp_path, tiny_tokenizer, n_train=8, n_eval=4)
  workdir = str(tmp_path / "run")
  args = cli_args(ws, workdir, num_steps=2, **{"checkpoint.every": 2, "eval.every": 0, "data.eval": ""})
  r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=subprocess_env(1))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Unable to initialize backend" not in r.stderr and "orbax" not in r.stderr.lower(), r.stderr
  assert not [x for x in r.stderr.splitlines() if x[:1] == "I" and "] " in x], r.stderr
  text = open(os.path.join(workdir, "log.txt")).read()
  assert "checkpoint" in text.lower(), text[:2000]
