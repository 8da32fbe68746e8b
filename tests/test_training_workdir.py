"""The work directory: one run at a time (a lock naming its holder), stale locks taken over, bad paths refused
before any work, and a refused run leaves no directory behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.training.workdir import LOCK_FILE, Workdir, WorkdirLock


def test_a_second_holder_is_refused_with_the_holders_name(tmp_path):
  first = WorkdirLock(str(tmp_path))
  assert first.acquire() == {}
  with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {os.getpid()} on host"):
    WorkdirLock(str(tmp_path)).acquire()
  first.release()
  second = WorkdirLock(str(tmp_path))
  assert second.acquire() == {}  # released cleanly: nothing stale
  second.release()


def test_the_lock_of_a_killed_process_is_stale(tmp_path):
  code = ("import sys, os; from gemma_jax.training.workdir import WorkdirLock; "
          f"WorkdirLock({str(tmp_path)!r}).acquire(); os._exit(0)")  # dies without releasing
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  holder = json.load(open(tmp_path / LOCK_FILE))
  assert holder["pid"] != os.getpid()
  lock = WorkdirLock(str(tmp_path))
  assert lock.acquire()["pid"] == holder["pid"]  # taken over, and says whose it was
  lock.release()


def test_bad_workdirs_are_refused_before_any_work(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match="exists and is not a directory"):
    with Workdir.open(str(tmp_path / "file")):
      pass
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    if os.access(ro, os.W_OK):
      pytest.skip("running as a user that can write anywhere (root without CAP_DAC_OVERRIDE dropped)")
    with pytest.raises(ConfigError, match="is not writable"):
      with Workdir.open(str(ro / "run")):
        pass
  finally:
    ro.chmod(0o755)


def test_read_only_workdir_as_root(tmp_path):
  """root writes through permission bits; a read-only mount is what stops it."""
  if os.geteuid() != 0:
    pytest.skip("needs root to mount")
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(mnt)]).returncode:
    pytest.skip("mount is not permitted here")
  try:
    with pytest.raises(ConfigError, match="not writable|Read-only"):
      with Workdir.open(str(mnt / "run")):
        pass
  finally:
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_refused_run_leaves_no_new_directory(tmp_path):
  path = tmp_path / "new"
  with pytest.raises(ConfigError, match="refused"):
    with Workdir.open(str(path)):
      raise ConfigError("refused")
  assert not path.exists()
  # An accepted run's directory stays, and so does an existing one.
  with Workdir.open(str(path)) as wd:
    from gemma_jax.training.run_config import default_config
    wd.write_config(default_config())
  assert (path / "config.json").exists()
  with pytest.raises(ConfigError):
    with Workdir.open(str(path)):
      raise ConfigError("refused")
  assert (path / "config.json").exists()


@pytest.mark.slow
def test_two_runs_in_one_workdir_and_signals_anywhere(tiny_tokenizer, tmp_path):
  """CLI: a second run on a held workdir is refused with one line naming the first; SIGTERM stops a run while it
  reads data (not only between steps), and between steps it saves and exits 0."""
  import signal
  import time
  from training_helpers import REPO, cli_args, make_workspace, run, subprocess_env
  ws = make_workspace(tmp_path, tiny_tokenizer)
  workdir = str(tmp_path / "run")
  over = {"num_steps": 100000, "checkpoint.every": 100000, "eval.every": 0, "data.eval": ""}
  a = subprocess.Popen(cli_args(ws, workdir, **over), env=subprocess_env(1), cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 180
    while not (os.path.exists(os.path.join(workdir, "metrics.jsonl"))
               and os.path.getsize(os.path.join(workdir, "metrics.jsonl"))):
      assert a.poll() is None and time.monotonic() < deadline, a.stdout.read() if a.poll() is not None else ""
      time.sleep(0.1)
    b = run(cli_args(ws, workdir, **over), devices=1, timeout=180)
    assert b.returncode == 1
    (line,) = b.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and f"is in use by another run (pid {a.pid} on host" in line, b.stderr
    assert "Traceback" not in b.stderr
    a.send_signal(signal.SIGTERM)
    out, _ = a.communicate(timeout=120)
    assert a.returncode == 0 and "stopped by signal at step" in out, out[-2000:]
  finally:
    a.kill()

  # SIGTERM while the training file is still being read and tokenized: it stops there, in one line.
  big = str(tmp_path / "big.jsonl")
  with open(big, "w") as f:  # distinct pairs, enough that reading them takes many seconds
    f.writelines(json.dumps({"prompt": f"hello {i} how are you", "chosen": f"fine {i}", "rejected": f"no {i}"}) + "\n"
                 for i in range(400_000))
  c = subprocess.Popen(cli_args({**ws, "train": big}, str(tmp_path / "c"), **over), env=subprocess_env(1),
                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert "device(s)" in c.stdout.readline()  # the banner: data preparation starts now
  time.sleep(0.3)
  sent = time.monotonic()
  c.send_signal(signal.SIGTERM)
  _, err = c.communicate(timeout=60)
  assert time.monotonic() - sent < 20
  assert c.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert err.strip().splitlines()[-1] == "error: interrupted by SIGTERM" and "Traceback" not in err, err[-3000:]
