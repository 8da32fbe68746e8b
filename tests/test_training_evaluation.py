"""Evaluation in a run: every held-out example scored (the last batch padded), the console summary, honest
tokens/s around evaluations and checkpoints, and the eval stop rate recorded in the model and warned about."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import pytest

from training_helpers import make_workspace, read_metrics, run_config
from gemma_jax import checkpoint
from gemma_jax.sampling.loading import load_sampler, stop_rate_warning
from gemma_jax.training import checkpointing, objectives, run_data
from gemma_jax.training.evaluation import Evaluator
from gemma_jax.training.loop import train
from gemma_jax.training.start import resolve_start


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_tokenizer):
  return make_workspace(tmp_path_factory.mktemp("ws"), tiny_tokenizer, n_eval=10)


def test_every_eval_example_is_scored_and_the_mean_is_over_real_examples(ws, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  cfg = run_config(ws, num_steps=1, **{"eval.every": 0, "eval.num_samples": 2})
  result = train(cfg, workdir)  # 10 held-out pairs at batch 4: batches of 4, 4 and 2 (+ 2 empty pairs)
  ev = result.eval_metrics
  assert ev["eval_examples"] == 10

  # Each pair scored alone, with the final params: the eval metrics are their plain means.
  final = checkpoint.load(os.path.join(workdir, "final"))
  from gemma_jax.model.transformer import Transformer
  start = resolve_start(cfg)
  loss_fn = jax.jit(objectives.make_loss_fn(cfg, Transformer(final.config), final.config))
  data = run_data.build(cfg, start.tokenizer, start.template, micro_batch=1, process_index=0, process_count=1)
  per = [loss_fn(final.params, b, None) for b in data.eval_batches()]
  assert len(per) == 10
  np.testing.assert_allclose(ev["eval_loss"], np.mean([float(l) for l, _ in per]), rtol=1e-5)
  for k in ("rewards/accuracies", "rewards/margins", "nll_loss", "logps/chosen"):
    np.testing.assert_allclose(ev[f"eval_{k}"], np.mean([float(m[k]) for _, m in per]), rtol=1e-5, atol=1e-7)

  # One console line per evaluation.
  out = capsys.readouterr().out
  (line,) = [l for l in out.splitlines() if l.startswith("eval step")]
  assert line.startswith(f"eval step 1: loss {ev['eval_loss']:.4f}, rewards/accuracies ") and "(10 examples, " in line

  # The model records what training did; its eval stop rate decides the sampler's warning.
  trained = final.metadata["provenance"]["trained"]
  assert trained["objective"] == "orpo" and trained["steps"] == 1 and trained["template"] == "gemma3"
  assert trained["train_examples"] == 48 and trained["eval_examples"] == 10
  assert trained["eval_stop_rate"] == ev["eval_stop_rate"] and trained["eval_sample_tokens"] == 4
  warnings = []
  load_sampler(os.path.join(workdir, "final"), warn=warnings.append)
  assert len(warnings) == (1 if trained["eval_stop_rate"] < 0.5 else 0)


def test_a_low_stop_rate_warns_in_one_line(tmp_path, tiny_tokenizer):
  from training_helpers import write_tiny_checkpoint
  path = write_tiny_checkpoint(str(tmp_path / "m"), tiny_tokenizer)
  for rate, warned in ((0.25, True), (0.5, False), (None, False)):
    md = checkpoint.read_metadata(path)
    trained = {"objective": "orpo", "steps": 2, "eval_sample_tokens": 64}
    if rate is not None:
      trained["eval_stop_rate"] = rate
    ck = checkpoint.load(path)
    checkpoint.save(str(tmp_path / f"m{rate}"), config=ck.config, params=ck.params, tokenizer=ck.tokenizer,
                    template=None, kind="it", provenance={**md["provenance"], "trained": trained})
    warnings = []
    load_sampler(str(tmp_path / f"m{rate}"), warn=warnings.append)
    assert len(warnings) == int(warned)
  assert stop_rate_warning({"trained": {"eval_stop_rate": 0.25, "steps": 2, "eval_sample_tokens": 64}}) == (
      "this fine-tune stopped in only 25% of its eval samples within 64 tokens (after 2 steps); it may not stop "
      "at end of turn: train longer / check that <end_of_turn> is a target")
  assert "\n" not in stop_rate_warning({"trained": {"eval_stop_rate": 0.0}})


def test_tokens_per_s_excludes_eval_and_checkpoint_time(ws, tmp_path, monkeypatch):
  pause = 2.0
  real_eval, real_save = Evaluator.__call__, checkpointing.RunCheckpointer.save

  def slow_eval(self, *a, **k):
    time.sleep(pause)
    return real_eval(self, *a, **k)

  def slow_save(self, *a, **k):
    saved = real_save(self, *a, **k)
    if saved:
      time.sleep(pause)
    return saved

  monkeypatch.setattr(Evaluator, "__call__", slow_eval)
  monkeypatch.setattr(checkpointing.RunCheckpointer, "save", slow_save)
  workdir = str(tmp_path / "run")
  cfg = run_config(ws, num_steps=5, **{"eval.every": 2, "checkpoint.every": 2, "eval.num_samples": 0})
  train(cfg, workdir)
  rows = {r["step"]: r for r in read_metrics(workdir) if "tokens_per_s" in r}
  start = resolve_start(cfg)
  data = run_data.build(cfg, start.tokenizer, start.template, micro_batch=4, process_index=0, process_count=1)
  tokens = [int(next(data.train)["input_mask"].sum()) for _ in range(5)]
  for s in (3, 5):  # the steps after an evaluation and a checkpoint (at 2 and 4)
    assert tokens[s - 1] / rows[s]["tokens_per_s"] < pause / 2, s
  assert rows[5]["epoch"] == pytest.approx(5 * 4 / 48)
