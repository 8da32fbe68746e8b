"""A run's curves from <workdir>/metrics.jsonl as PNG files (matplotlib, no display needed).

    paths, series = plot("/tmp/run")                  # loss.png, accuracy.png, margins.png, stop_rate.png
    plot("/tmp/demo/run", out_dir="/tmp/demo")       # written elsewhere

One figure per entry of FIGURES, written only when the file has that metric. Reads our metric names and TRL's
(`eval/loss` or `eval_loss`, `rewards/accuracies` or `eval_rewards/accuracies`, ...).
"""

from __future__ import annotations

import math
import os

from gemma_jax.errors import UserError
from gemma_jax.training.metrics import read_rows

# figure -> [(label, names the metric goes by)]; the first name a row has is used
FIGURES = {
    "loss": [("train loss", ("loss", "train/loss")), ("eval loss", ("eval/loss", "eval_loss"))],
    "accuracy": [("train reward accuracy", ("rewards/accuracies",)),
                 ("eval reward accuracy", ("eval/rewards/accuracies", "eval_rewards/accuracies"))],
    "margins": [("train reward margin", ("rewards/margins",)),
                ("eval reward margin", ("eval/rewards/margins", "eval_rewards/margins"))],
    "stop_rate": [("eval greedy samples ending their turn", ("eval_stop_rate",))],
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


def plot(workdir: str, out_dir: str | None = None
         ) -> tuple[list[str], dict[str, dict[str, tuple[list[int], list[float]]]]]:
  """Writes one PNG per figure into `out_dir` (default: `workdir`); returns (their paths, the series plotted)."""
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
    path = os.path.join(out_dir or workdir, f"{fig_name}.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths, series
