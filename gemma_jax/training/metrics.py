"""Metrics of a run: `metrics.jsonl` (one JSON row per logged step and per evaluation) and TensorBoard events
(when the `tensorboard` extra, tensorboardX, is installed).

Names are TRL's: a step row has loss, learning_rate, epoch, grad_norm, the objective's metrics (rewards/chosen,
rewards/accuracies, nll_loss, ...) and tokens_per_s; an evaluation row the same prefixed eval_ (eval_loss,
eval_rewards/accuracies, ...) plus eval_examples, eval_runtime (s) and eval_stop_rate.

Written by process 0 only. On resume from step s, rows after s (from steps that will run again) are dropped, and
an evaluation already logged for a step is not logged twice.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
EVAL_PREFIXES = ("eval_", "eval/")  # TRL's eval_loss, ...; "eval/" in the files of older runs


def jsonable(v):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # "nan" / "inf": JSON has no such numbers
  return v


def _is_eval(row: dict[str, Any]) -> bool:
  return any(k.startswith(EVAL_PREFIXES) for k in row)


def read_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl that parse and carry an integer step (a row cut short by a kill is skipped)."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:  # a row cut short by a kill
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int):
        rows.append(row)
  return rows


TENSORBOARD_HINT = ('note: no TensorBoard events (tensorboardX is not installed); metrics.jsonl has every '
                    'metric, `python -m train.plot --workdir=...` draws them; for TensorBoard: '
                    'pip install -e ".[tensorboard]"')
_hinted = False


def _tensorboard_writer(workdir: str):
  """tensorboardX's SummaryWriter, or None (said once per process) when it is not installed (an extra)."""
  global _hinted
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    if not _hinted:
      print(TENSORBOARD_HINT, flush=True)
      _hinted = True
    return None
  return SummaryWriter(workdir)


class MetricsWriter:
  """Appends rows to metrics.jsonl and scalars (and text) to TensorBoard; `resume_step` trims a resumed file."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.primary = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self.eval_rows: dict[int, dict[str, Any]] = {}  # step -> its logged evaluation
    self._file = self._tb = None
    if not self.primary:
      return
    if resume_step is not None and os.path.exists(self.path):
      # Rows of steps that will run again, and the end-of-run summary, are written anew.
      rows = [r for r in read_rows(self.path) if r["step"] <= resume_step and "run/steps" not in r]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      os.replace(tmp, self.path)
      self.eval_rows = {r["step"]: r for r in rows if _is_eval(r)}
    self._file = open(self.path, "a")
    self._tb = _tensorboard_writer(workdir)

  def write(self, step: int, metrics: dict[str, Any], text: dict[str, str] | None = None) -> None:
    if not self.primary:
      return
    row = {"step": int(step), **{k: jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if _is_eval(row):
      self.eval_rows[int(step)] = row
    if self._tb is None:
      return
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    for k, v in (text or {}).items():
      self._tb.add_text(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.primary:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
