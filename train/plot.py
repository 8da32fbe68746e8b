"""Draws a run's curves from <workdir>/metrics.jsonl as PNG files in the workdir.

    python -m train.plot --workdir=/tmp/run

Writes loss.png (training and eval loss), accuracy.png (reward accuracy) and margins.png (reward margins),
each only when the file has that metric. Reads our metric names and TRL's (`eval/loss` or `eval_loss`,
`rewards/accuracies` or `eval_rewards/accuracies`, ...).
"""

from __future__ import annotations

import math
import os

from absl import app, flags

from gemma_jax.errors import UserError
from gemma_jax.training.metrics import read_rows

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a training run (holds metrics.jsonl).")

# figure -> [(label, names the metric goes by)]; the first name a row has is used
FIGURES = {
    "loss": [("train loss", ("loss", "train/loss")), ("eval loss", ("eval/loss", "eval_loss"))],
    "accuracy": [("train reward accuracy", ("rewards/accuracies",)),
                 ("eval reward accuracy", ("eval/rewards/accuracies", "eval_rewards/accuracies"))],
    "margins": [("train reward margin", ("rewards/margins",)),
                ("eval reward margin", ("eval/rewards/margins", "eval_rewards/margins"))],
}


def _number(v) -> float | None:
  if isinstance(v, bool):
    return None
  if isinstance(v, (int, float)):
    return float(v)
  if v in ("nan", "inf", "-inf"):  # how metrics.jsonl writes non-finite values
    return float(v)
  return None


def read_series(path: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
  """metrics.jsonl -> {figure: {label: (steps, values)}}, only the series with at least one point."""
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file; pass the --workdir of a training run (it writes metrics.jsonl)")
  rows = read_rows(path)
  if not rows:
    raise UserError(f"{path}: no metrics yet (the run logs every `log_every` steps)")
  out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
  for fig, series in FIGURES.items():
    for label, names in series:
      steps, values = [], []
      for row in rows:
        name = next((n for n in names if n in row), None)
        v = _number(row[name]) if name else None
        if v is not None:
          steps.append(row["step"])
          values.append(v)
      if steps:
        out.setdefault(fig, {})[label] = (steps, values)
  if not out:
    raise UserError(f"{path}: none of the plotted metrics (loss, reward accuracy, margins) is in the file")
  return out


def plot(workdir: str) -> tuple[list[str], dict[str, dict[str, tuple[list[int], list[float]]]]]:
  """Writes one PNG per figure into `workdir`; returns (their paths, the series plotted)."""
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  series = read_series(os.path.join(workdir, "metrics.jsonl"))
  paths = []
  for fig_name, lines in series.items():
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, (steps, values) in lines.items():
      finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
      ax.plot([s for s, _ in finite], [v for _, v in finite], marker="o" if len(finite) < 30 else None,
              markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(fig_name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, f"{fig_name}.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths, series


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from gemma_jax.errors import run_main

  def run():
    if not _WORKDIR.value:
      raise UserError("--workdir=DIR is required: the work directory of a training run")
    paths, _ = plot(_WORKDIR.value)
    for p in paths:
      print(f"wrote {p}")
  run_main(run)


if __name__ == "__main__":
  app.run(main)
