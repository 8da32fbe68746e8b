"""Draws a run's curves from <workdir>/metrics.jsonl as PNG files in the workdir.

    python -m train.plot --workdir=/tmp/run

Writes loss.png (training and eval loss), accuracy.png (reward accuracy), margins.png (reward margins) and
stop_rate.png (the share of eval greedy samples that ended their turn),
each only when the file has that metric. Reads our metric names and TRL's (`eval/loss` or `eval_loss`,
`rewards/accuracies` or `eval_rewards/accuracies`, ...).
"""

from __future__ import annotations

from absl import app, flags

from gemma_jax.errors import UserError
from gemma_jax.training.plots import plot

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a training run (holds metrics.jsonl).")


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
