"""The main job, shortened: `python -m train.demo` on the real Gemma 3 270M turns the base model into one that
ends its turns, with preference accuracy up, and writes the report, the plots and a chat-ready checkpoint.
Also the pieces it reports: the end-of-turn target count and the report's table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from training_helpers import subprocess_env
from gemma_jax.chat_demo import DemoOptions, eot_targets, read_jsonl, render_report
from gemma_jax.errors import UserError
from gemma_jax.templates import ChatTemplate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "data", "demo")


def test_every_chosen_demo_target_ends_with_end_of_turn(tiny_tokenizer):
  records = read_jsonl(os.path.join(DEMO, "eval.jsonl"))[:20]
  assert eot_targets(records, ChatTemplate("gemma3"), tiny_tokenizer) == (20, 20)
  # a completion template has no turn to end: its targets end with eos, which is not end-of-turn
  single = [r for r in records if isinstance(r["prompt"], str)]
  assert eot_targets(single, ChatTemplate("completion"), tiny_tokenizer) == (0, len(single))


def test_read_jsonl_names_the_bad_line(tmp_path):
  p = tmp_path / "x.jsonl"
  p.write_text('{"prompt": "a"}\n\n{oops\n')
  with pytest.raises(UserError, match=r"x.jsonl:3: broken JSON"):
    read_jsonl(str(p))
  with pytest.raises(UserError, match="no such file"):
    read_jsonl(str(tmp_path / "missing.jsonl"))


def _report(**over):
  s = {"examples": 2, "stop_rate": 0.0, "accuracy": 0.5, "mean_reply_tokens": 48.0}
  r = {"base_chat": s, "base_few_shot": {"examples": 2, "accuracy": 0.5, "mean_reply_tokens": 6.0},
       "tuned_chat": {**s, "stop_rate": 1.0, "mean_reply_tokens": 7.5}, "tuned_no_template": s,
       "preference_accuracy": {"base": 0.25, "tuned": 0.875},
       "eot_targets": {"chosen_ending_with_eot": 3, "train_pairs": 3},
       "training": {"steps": 5, "template": "gemma3", "objective": "orpo", "lr": 2e-5, "orpo_lambda": 0.1,
                    "batch_size": 8},
       "transcripts": [{"conversation": [{"role": "user", "content": "What is 2 + 2?"}], "base_chat": "What is",
                        "base_few_shot": "4.", "tuned_chat": "It is 4.", "answer": "4"}],
       "no_template_transcripts": [], "final_dir": "/x/run/final",
       "timings": {"base_eval_s": 1, "train_s": 2, "tuned_eval_s": 3, "total_s": 6}}
  r.update(over)
  return r


def test_report_table():
  text = render_report(_report(), DemoOptions())
  assert "| ends its turn (stop rate) | 0% | n/a | 100% |" in text
  assert "| preference accuracy (chosen log-prob > rejected) | 25% | n/a | 88% |" in text
  assert "| mean reply length (tokens) | 48.0 | 6.0 | 7.5 |" in text
  assert "- tuned: 'It is 4.'" in text and "--ckpt=/x/run/final" in text
  assert "n/a | n/a |" in render_report(_report(preference_accuracy={"base": None, "tuned": None}), DemoOptions())


@pytest.mark.slow
def test_demo_on_the_real_model_learns_to_stop(tmp_path):
  """A few ORPO steps on the bundled pairs: the stop rate and the preference accuracy rise from the base's."""
  work = tmp_path / "demo"
  cmd = [sys.executable, "-m", "train.demo", f"--workdir={work}", "--eval_limit=8", "--max_new_tokens=24",
         "--transcripts=2", "--config.num_steps=10", "--config.optim.lr=2e-4", "--config.eval.every=0",
         "--config.eval.max_batches=2", "--config.eval.num_samples=0", "--config.progress=False",
         "--config.merge_alpha=1.0"]  # 10 steps, unmerged: the recipe's merge at 0.7 needs its 24 steps to stop
  env = subprocess_env(1)  # one CPU device, as a user runs it
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  report = json.loads((work / "report.json").read_text())
  base, tuned = report["base_chat"], report["tuned_chat"]
  assert base["examples"] == tuned["examples"] == 8
  assert tuned["stop_rate"] > base["stop_rate"]
  assert tuned["mean_reply_tokens"] < base["mean_reply_tokens"]
  pa = report["preference_accuracy"]
  assert pa["base"] is not None and pa["tuned"] > pa["base"]
  assert report["eot_targets"]["chosen_ending_with_eot"] == report["eot_targets"]["train_pairs"] == 976
  assert report["training"]["steps"] == 10
  for name in ("report.md", "loss.png", "accuracy.png", "margins.png"):
    assert (work / name).is_file(), name
  from gemma_jax import checkpoint
  md = checkpoint.read_metadata(report["final_dir"])
  assert md["kind"] == "it" and md["template"]["name"] == "gemma3"
  assert "ends its turn" in r.stdout and "Traceback" not in r.stderr
