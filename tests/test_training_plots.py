"""gemma_jax.training.plots (and the train.plot script): the curves of a synthetic metrics.jsonl (ours and
TRL's names) as valid PNGs of the file's values; one-line errors; and the metrics writer without tensorboardX."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from gemma_jax.errors import UserError
from gemma_jax.training.plots import plot, read_series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_size(path: str) -> tuple[int, int]:
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
  return struct.unpack(">II", data[16:24])


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_plots_hold_the_files_values_under_either_names(tmp_path):
  rows = [
      {"step": 1, "loss": 2.5, "rewards/accuracies": 0.25, "rewards/margins": 0.1, "lr": 0.0},
      {"step": 2, "loss": 2.0, "rewards/accuracies": 0.5, "rewards/margins": "nan", "learning_rate": 1e-3},
      {"step": 2, "eval/loss": 2.2, "eval/rewards/accuracies": 0.5, "eval/rewards/margins": 0.3},
      '{"step": 3, "loss": 1.',  # cut short by a kill
      {"step": 3, "loss": 1.5, "rewards/accuracies": 0.75, "rewards/margins": 0.4},
      {"step": 4, "eval_loss": 1.9, "eval_rewards/accuracies": 0.625, "eval_rewards/margins": 0.5},  # TRL names
  ]
  _write(tmp_path / "metrics.jsonl", rows)
  paths, series = plot(str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ["accuracy.png", "loss.png", "margins.png"]
  for p in paths:
    w, h = _png_size(p)
    assert w > 100 and h > 100 and os.path.getsize(p) > 1000
  assert series["loss"] == {"train loss": ([1, 2, 3], [2.5, 2.0, 1.5]), "eval loss": ([2, 4], [2.2, 1.9])}
  assert series["accuracy"] == {"train reward accuracy": ([1, 2, 3], [0.25, 0.5, 0.75]),
                                "eval reward accuracy": ([2, 4], [0.5, 0.625])}
  margins = series["margins"]["train reward margin"]
  assert margins[0] == [1, 2, 3] and margins[1][0] == 0.1 and margins[1][1] != margins[1][1]  # nan kept
  assert series["margins"]["eval reward margin"] == ([2, 4], [0.3, 0.5])


def test_only_the_metrics_present_are_drawn(tmp_path):
  _write(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])  # SFT: no rewards
  paths, series = plot(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["loss.png"] and series == {"loss": {"train loss": ([1, 2],
                                                                                                   [1.0, 0.5])}}


def test_missing_and_empty_files_are_one_line_errors(tmp_path):
  with pytest.raises(UserError, match="no such file"):
    plot(str(tmp_path))
  _write(tmp_path / "metrics.jsonl", [])
  with pytest.raises(UserError, match="no metrics yet"):
    plot(str(tmp_path))
  r = subprocess.run([sys.executable, "-m", "train.plot", f"--workdir={tmp_path / 'nowhere'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and r.stdout == ""
  assert r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_metrics_writer_without_tensorboardx(tmp_path, monkeypatch, capsys):
  """Without the extra, metrics.jsonl is written as before and the hint is said once."""
  from gemma_jax.training import metrics
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` raises ImportError
  monkeypatch.setattr(metrics, "_hinted", False)
  for d in ("a", "b"):
    os.makedirs(tmp_path / d)
    w = metrics.MetricsWriter(str(tmp_path / d))
    w.write(1, {"loss": 1.5}, text={"sample": "x"})
    w.close()
    assert [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] == [{"step": 1, "loss": 1.5}]
    assert not [n for n in os.listdir(tmp_path / d) if n.startswith("events")]
  out = capsys.readouterr().out
  assert out.count("tensorboardX is not installed") == 1 and 'pip install -e ".[tensorboard]"' in out
