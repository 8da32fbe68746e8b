"""Multi-host: two local CPU processes of four simulated devices each (jax.distributed over gloo) train to the
same losses, eval metrics and parameters as one process with eight devices."""

from __future__ import annotations

import os
import socket
import subprocess

import jax
import numpy as np
import pytest

from training_helpers import REPO, cli_args, make_workspace, read_metrics, subprocess_env
from gemma_jax import checkpoint

pytestmark = pytest.mark.slow  # end to end, as processes: `bash scripts/test.sh --slow`

TIMEOUT = 300
COMMON = {"num_steps": 4, "checkpoint.every": 2, "eval.every": 2, "eval.num_samples": 0, "optim.lr": 1e-3}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tiny_tokenizer, tmp_path):
  ws = make_workspace(tmp_path, tiny_tokenizer)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  port = free_port()
  procs = []
  try:
    procs.append(subprocess.Popen(cli_args(ws, one, **COMMON), env=subprocess_env(8), cwd=REPO,
                                  stdout=open(tmp_path / "one.log", "w"), stderr=subprocess.STDOUT))
    for i in range(2):
      args = cli_args(ws, two, **COMMON) + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                            f"--process_id={i}"]
      procs.append(subprocess.Popen(args, env=subprocess_env(4), cwd=REPO, stdout=open(tmp_path / f"two{i}.log", "w"),
                                    stderr=subprocess.STDOUT))
    for p, name in zip(procs, ("one", "two0", "two1")):
      assert p.wait(timeout=TIMEOUT) == 0, open(tmp_path / f"{name}.log").read()[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()

  assert "2 process(es), 8 cpu device(s)" in open(tmp_path / "two0.log").read()
  a, b = read_metrics(one), read_metrics(two)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4, 4]  # the last: run summary
  for x, y in zip(a, b):
    timings = {"step", "tokens_per_s", "eval_runtime"}
    keys = [k for k in x if k not in timings]
    assert set(keys) == set(y) - timings
    for k in keys:
      # (atol: metrics near 0, such as log_odds_chosen ~ -0.08, differ by ~2e-6 in f32 across reduction orders)
      np.testing.assert_allclose(y[k], x[k], rtol=1e-5, atol=1e-5, err_msg=f"step {x['step']} {k}")
  assert "eval_loss" in a[2] and "loss" in a[0]

  p1 = checkpoint.load(os.path.join(one, "final")).params
  p2 = checkpoint.load(os.path.join(two, "final")).params
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_initialize_arguments(monkeypatch):
  """Partial multi-host settings are a one-line error; a plain single process initializes nothing."""
  import pytest
  from gemma_jax.errors import ConfigError
  from gemma_jax.training import distributed
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", *distributed._CLUSTER_ENV):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(distributed, "_initialized", False)
  with pytest.raises(ConfigError, match="num_processes, process_id not given"):
    distributed.initialize("localhost:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  with pytest.raises(ConfigError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
    distributed.initialize("localhost:1234")
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  monkeypatch.delenv("JAX_PROCESS_ID")
  assert distributed.initialize() is False and jax.process_count() == 1
