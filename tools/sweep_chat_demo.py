"""The chat demo's hyper-parameter sweep: ORPO runs of configs/chat_demo.py with a few fields changed, each tuned
model answering the held-out questions; one table row per run (markdown, for BENCHMARKS.md) and sweep.jsonl.

    python tools/sweep_chat_demo.py --out=/tmp/sweep --points="optim.lr=1e-5;optim.lr=3e-5,num_steps=60"

A point is comma-separated `field=value` overrides of the recipe; points are separated by ";". The base model
is evaluated once (both settings) and every point is compared to it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_OUT = flags.DEFINE_string("out", "/tmp/chat-demo-sweep", "Directory for the runs and sweep.jsonl.")
_POINTS = flags.DEFINE_string("points", "", "Overrides per point: 'a=1,b=2;a=3'.")
_EVAL_LIMIT = flags.DEFINE_integer("eval_limit", 0, "Held-out questions (0 = all).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Reply budget.")


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _config(overrides: dict):
  from configs.chat_demo import get_config
  c = get_config()
  c.progress = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(v) if node[leaf] is not None else v
  return c


def main(argv):
  del argv
  from gemma_jax import checkpoint, console
  from gemma_jax.answer_eval import evaluate_answers, few_shot_examples
  from gemma_jax.chat_demo import PREFERENCE_ACCURACY, read_jsonl
  from gemma_jax.sampling.engine import Sampler
  from gemma_jax.training.loop import train
  from gemma_jax.training.metrics import read_rows
  from gemma_jax.training.start import resolve_start

  os.makedirs(_OUT.value, exist_ok=True)
  console.setup(os.path.join(_OUT.value, "log.txt"), mode="a")
  base_config = _config({})
  questions = read_jsonl(base_config.data.eval)
  questions = questions[:_EVAL_LIMIT.value] if _EVAL_LIMIT.value else questions
  kw = dict(max_new_tokens=_MAX_NEW.value, batch_size=16)
  out_path = os.path.join(_OUT.value, "sweep.jsonl")
  done = {}
  if os.path.exists(out_path):
    done = {json.dumps(r["point"], sort_keys=True): r for r in map(json.loads, open(out_path))}

  def answers(path, template=None, shots=None):
    ck = checkpoint.load(path)
    s = Sampler(ck.config, ck.params, ck.tokenizer)
    if shots is not None:
      return evaluate_answers(s, questions, few_shot=shots, **kw).summary()
    return evaluate_answers(s, questions, chat=template, **kw).summary()

  start = resolve_start(base_config)
  base_key = json.dumps({"base": True}, sort_keys=True)
  if base_key not in done:
    shots = few_shot_examples(read_jsonl(base_config.data.train))
    row = {"point": {"base": True}, "chat": answers(start.path, start.template),
           "few_shot": answers(start.path, shots=shots)}
    with open(out_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    done[base_key] = row
  print(f"base: {done[base_key]}", flush=True)

  for i, spec in enumerate(p for p in _POINTS.value.split(";") if p.strip()):
    point = {k.strip(): _value(v.strip()) for k, v in (kv.split("=", 1) for kv in spec.split(","))}
    key = json.dumps(point, sort_keys=True)
    if key in done:
      print(f"{point}: {done[key]}", flush=True)
      continue
    config = _config(point)
    name = "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())
    run_dir = os.path.join(_OUT.value, f"run{i}-" + re.sub(r"[^A-Za-z0-9._=-]+", "_", name))  # a regex value
    t = time.perf_counter()
    result = train(config, run_dir)
    train_s = time.perf_counter() - t
    evals = [r for r in read_rows(os.path.join(run_dir, "metrics.jsonl")) if PREFERENCE_ACCURACY in r]
    row = {"point": point, "steps": result.step, "train_s": round(train_s, 1),
           "chat": answers(result.final_dir, start.template),
           "preference_accuracy": evals[-1][PREFERENCE_ACCURACY] if evals else None,
           "eval_loss": evals[-1].get("eval_loss") if evals else None}
    with open(out_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(f"{point}: {row}", flush=True)
    for name in ("checkpoints", "final"):  # 4 GB a point; metrics.jsonl and config.json stay
      shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
