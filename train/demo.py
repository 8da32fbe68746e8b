"""The main job: the real Gemma 3 270M base model turned into a chat model that answers and stops, measured.

    python -m train.demo                                   # what `bash scripts/run.sh` runs
    python -m train.demo --workdir=/tmp/demo --config.num_steps=60 --config.optim.lr=3e-5
    python -m train.demo --config.init_from=/ckpt/gemma3-1b-pt --config.data.train=prefs.jsonl \
        --config.data.eval=prefs_test.jsonl

Evaluates the base model on the held-out questions (in the chat template and as a few-shot completion), runs
ORPO (configs/chat_demo.py; any field can be overridden with --config.<field>=value), evaluates the tuned
model, and writes report.md, report.json and plots (loss, reward accuracy and margins, stop rate) into
--workdir; the tuned model is <workdir>/run/final (`python -m sample.chat --ckpt=<workdir>/run/final`).
Library logs go to <workdir>/log.txt. Running it again on the same --workdir resumes or reuses the training run.
"""

from __future__ import annotations

import os

from absl import app, flags

from gemma_jax import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = cli.define_config_file("config", os.path.join(_ROOT, "configs", "chat_demo.py"),
                                 "Run config file of the ORPO step; override fields with --config.<field>=value.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/chat-demo", "Directory for the run, the report and the plots.")
_EVAL_LIMIT = flags.DEFINE_integer("eval_limit", 0, "Held-out questions to answer before and after (0 = all).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Reply budget; a reply not ended by then did not stop.")
_BATCH = flags.DEFINE_integer("sample_batch", 16, "Sampling batch size.")
_TRANSCRIPTS = flags.DEFINE_integer("transcripts", 4, "Questions shown side by side in the report.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from gemma_jax import console
  from gemma_jax.errors import UserError, run_main

  def run():
    for name, flag in (("eval_limit", _EVAL_LIMIT), ("transcripts", _TRANSCRIPTS)):
      if flag.value < 0:
        raise UserError(f"--{name}={flag.value}: must be >= 0")
    for name, flag in (("max_new_tokens", _MAX_NEW), ("sample_batch", _BATCH)):
      if flag.value < 1:
        raise UserError(f"--{name}={flag.value}: must be >= 1")
    workdir = os.path.abspath(_WORKDIR.value)
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise UserError(f"--workdir={_WORKDIR.value}: cannot create it ({e.strerror})") from None
    console.setup(os.path.join(workdir, "log.txt"), mode="a")
    from gemma_jax.chat_demo import DemoOptions, run_demo
    run_demo(_CONFIG.value, workdir, DemoOptions(eval_limit=_EVAL_LIMIT.value, max_new_tokens=_MAX_NEW.value,
                                                 batch_size=_BATCH.value, transcripts=_TRANSCRIPTS.value))
  run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
