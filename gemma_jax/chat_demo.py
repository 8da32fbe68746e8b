"""The main job: a pretrained (PT) Gemma turned into a chat model with ORPO, measured before and after.

    report = run_demo(config, "runs/chat-demo")     # config: a run config (configs/chat_demo.py)

1. The base model answers the held-out questions twice: in the chat template it will be trained on (a PT model
   continues the text: it rarely ends its turn), and as a few-shot completion (its fairest setting).
2. ORPO (`gemma_jax.training.train`, the run in `<workdir>/run`), evaluated at the start, every `eval.every`
   steps and at the end: eval loss, preference (reward) accuracy and margins, the stop rate of greedy samples.
3. The tuned model (`<workdir>/run/final`, its chat template saved with it) answers again; a few questions are
   also asked without the template, to show what a template mismatch does.
4. `report.md` / `report.json` and the plots (`gemma_jax.training.plots`, the stop rate among them) in `<workdir>`.

The three lessons it shows: a PT model continues instead of answering; the template used in training must be
used in sampling; a model learns to stop only when end-of-turn is a training target (every chosen target here
ends with it, which the report counts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import ml_collections

from gemma_jax.answer_eval import AnswerEval, evaluate_answers, few_shot_examples, messages_of
from gemma_jax.data.preference import parse_preference, render_pair
from gemma_jax.data.records import Invalid, read_records
from gemma_jax.errors import DataError, UserError
from gemma_jax.sampling.chat import resolve_template
from gemma_jax.sampling.loading import load_sampler
from gemma_jax.templates import ChatTemplate
from gemma_jax.training.loop import train
from gemma_jax.training.metrics import read_rows
from gemma_jax.training.plots import plot
from gemma_jax.training.start import resolve_start

RUN_DIR = "run"  # the training run inside the demo's work directory
PREFERENCE_ACCURACY = "eval_rewards/accuracies"  # chosen average log-prob above rejected, per held-out pair


@dataclasses.dataclass(frozen=True)
class DemoOptions:
  eval_limit: int = 0  # held-out questions the answers are measured on (0 = all)
  max_new_tokens: int = 32  # reply budget: a reply that has not ended its turn by then did not stop
  batch_size: int = 16  # sampling batch
  transcripts: int = 4  # questions shown side by side in the report
  mismatch_questions: int = 8  # tuned model asked without its template


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a data file (any format `data.records` reads) as dicts; the first record that cannot be
  read is one UserError naming the file and line (the demo's data is ours: nothing is skipped)."""
  out = []
  for rec in read_records(path):
    if isinstance(rec, Invalid):
      raise DataError(f"{rec}; fix or remove the line")
    out.append(rec.data)
  return out


def eot_targets(records: list[dict[str, Any]], template: ChatTemplate, tokenizer) -> tuple[int, int]:
  """(chosen replies whose last training target is the template's end-of-turn token, records)."""
  eot = template.stop_token_ids(tokenizer)
  n = 0
  for r in records:
    _, (ids, mask), _ = render_pair(parse_preference(r), template, tokenizer, eos_target=False)
    targets = ids[mask]
    n += bool(len(targets)) and int(targets[-1]) in eot
  return n, len(records)


def _eval_rows(run_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(run_dir, "metrics.jsonl")
  return [r for r in read_rows(path) if PREFERENCE_ACCURACY in r] if os.path.isfile(path) else []


def run_demo(config: ml_collections.ConfigDict, workdir: str, options: DemoOptions = DemoOptions(),
             echo: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the four steps of the module docstring; returns the report (also written as report.json/.md)."""
  if not config.data.eval:
    raise UserError("the demo needs held-out questions: set --config.data.eval=FILE (data/demo/eval.jsonl)")
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  run_dir = os.path.join(workdir, RUN_DIR)
  held_out = read_jsonl(config.data.eval)
  questions = held_out[:options.eval_limit] if options.eval_limit else held_out
  train_records = [r for p in config.data.train.split(",") for r in read_jsonl(p)]
  start = resolve_start(config)
  if start.path is None:
    raise UserError(f"init_from={config.init_from!r}: the demo tunes a pretrained checkpoint, not a random init")
  template = start.template
  kw = dict(max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)
  timings = {}

  echo(f"1/4 the base model ({start.path}, kind {start.kind}) answers {len(questions)} held-out questions")
  t = time.perf_counter()
  _, base = load_sampler(start.path)
  base_chat = evaluate_answers(base, questions, chat=template, progress="base, chat template", **kw)
  shots = few_shot_examples(train_records)
  base_few = evaluate_answers(base, questions, few_shot=shots, progress="base, few-shot", **kw)
  del base
  timings["base_eval_s"] = time.perf_counter() - t
  echo(f"    chat template: {_line(base_chat)}\n    few-shot ({len(shots)} examples): {_line(base_few)}")

  eot, n_train = eot_targets(train_records, template, start.tokenizer)
  echo(f"2/4 ORPO on {n_train} pairs ({eot} chosen targets end with end-of-turn); run in {run_dir}")
  t = time.perf_counter()
  result = train(config, run_dir)
  timings["train_s"] = time.perf_counter() - t
  if result.stopped_by_signal or result.final_dir is None:
    raise UserError(f"training stopped at step {result.step} before the end; run the same command to resume")

  echo(f"3/4 the tuned model ({result.final_dir}) answers the same questions")
  t = time.perf_counter()
  ck, tuned = load_sampler(result.final_dir)
  saved = resolve_template("auto", ck.template, ck.config.family, kind=ck.kind, for_chat=True)
  tuned_chat = evaluate_answers(tuned, questions, chat=saved, progress="tuned, chat template", **kw)
  single = [q for q in questions if isinstance(q["prompt"], str)][:options.mismatch_questions]
  mismatch = evaluate_answers(tuned, single, chat=ChatTemplate("completion"), progress="tuned, no template",
                              **kw)
  del tuned
  timings["tuned_eval_s"] = time.perf_counter() - t
  echo(f"    chat template: {_line(tuned_chat)}\n    without its template: {_line(mismatch)}")

  evals = _eval_rows(run_dir)
  report = {
      "base_chat": base_chat.summary(), "base_few_shot": base_few.summary(), "tuned_chat": tuned_chat.summary(),
      "tuned_no_template": mismatch.summary(),
      "preference_accuracy": {"base": evals[0][PREFERENCE_ACCURACY] if evals and evals[0]["step"] == 0 else None,
                              "tuned": evals[-1][PREFERENCE_ACCURACY] if evals else None},
      "eot_targets": {"chosen_ending_with_eot": eot, "train_pairs": n_train},
      "training": {"steps": result.step, "template": template.name, "objective": config.objective,
                   "lr": config.optim.lr, "orpo_lambda": config.loss.orpo_lambda, "batch_size": config.batch_size},
      "transcripts": _transcripts(questions, base_chat, base_few, tuned_chat, options.transcripts),
      "no_template_transcripts": [{"question": a.question, "reply": a.reply} for a in mismatch.answers[:3]],
      "final_dir": result.final_dir, "timings": timings,
  }
  echo("4/4 report and plots")
  report["plots"] = [os.path.basename(p) for p in plot(run_dir, out_dir=workdir)[0]]
  report["timings"]["total_s"] = time.perf_counter() - t_start
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  text = render_report(report, options)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  echo(text)
  return report


def _line(ev: AnswerEval) -> str:
  s = ev.summary()
  parts = [f"stop rate {s['stop_rate']:.0%}"] if "stop_rate" in s else []
  if "accuracy" in s:
    parts.append(f"accuracy {s['accuracy']:.0%}")
  parts.append(f"mean reply {s['mean_reply_tokens']:.1f} tokens")
  return ", ".join(parts)


def _transcripts(questions, base_chat: AnswerEval, base_few: AnswerEval, tuned: AnswerEval, n: int) -> list:
  """The first `n` questions, with one of each type first when there are enough."""
  order, seen = [], set()
  for i, q in enumerate(questions):
    if q.get("type") not in seen:
      seen.add(q.get("type"))
      order.append(i)
  order += [i for i in range(len(questions)) if i not in order]
  out = []
  for i in order[:n]:
    msgs = messages_of(questions[i])
    out.append({"conversation": msgs, "base_chat": base_chat.answers[i].reply,
                "base_few_shot": base_few.answers[i].reply, "tuned_chat": tuned.answers[i].reply,
                "answer": questions[i].get("answer")})
  return out


def _pct(v) -> str:
  return "n/a" if v is None else f"{v:.0%}"


def render_report(r: dict[str, Any], options: DemoOptions) -> str:
  """The report as Markdown: the before/after table, the lessons, transcripts side by side."""
  bc, bf, tc, nt = r["base_chat"], r["base_few_shot"], r["tuned_chat"], r["tuned_no_template"]
  pa = r["preference_accuracy"]
  tr = r["training"]
  lines = [
      f"# Chat demo: ORPO, {tr['steps']} steps (lr {tr['lr']:g}, lambda {tr['orpo_lambda']:g}, "
      f"{tr['batch_size']} pairs per step), template {tr['template']!r}",
      "",
      f"Held-out questions: {bc['examples']}; replies greedy, at most {options.max_new_tokens} tokens; accuracy "
      "= the right answer in the reply's first line.",
      "",
      "| | base, chat template | base, few-shot | tuned, chat template |",
      "|---|---|---|---|",
      f"| ends its turn (stop rate) | {_pct(bc.get('stop_rate'))} | n/a | {_pct(tc.get('stop_rate'))} |",
      f"| accuracy | {_pct(bc.get('accuracy'))} | {_pct(bf.get('accuracy'))} | {_pct(tc.get('accuracy'))} |",
      f"| preference accuracy (chosen log-prob > rejected) | {_pct(pa['base'])} | n/a | {_pct(pa['tuned'])} |",
      f"| mean reply length (tokens) | {bc['mean_reply_tokens']:.1f} | {bf['mean_reply_tokens']:.1f} | "
      f"{tc['mean_reply_tokens']:.1f} |",
      "",
      "Lessons:",
      f"1. A PT model continues text instead of answering: in the chat template the base model ended "
      f"{_pct(bc.get('stop_rate'))} of its turns.",
      f"2. The template is part of the model: the tuned model asked without it ({nt['examples']} questions) "
      f"ended {_pct(nt.get('stop_rate'))} of its replies, accuracy {_pct(nt.get('accuracy'))}.",
      f"3. Stopping is learned when end-of-turn is a target: {r['eot_targets']['chosen_ending_with_eot']} of "
      f"{r['eot_targets']['train_pairs']} chosen replies end with it; the tuned model ended "
      f"{_pct(tc.get('stop_rate'))} of its turns.",
      "",
      "## Transcripts",
  ]
  for t in r["transcripts"]:
    conv = " / ".join(f"{m['role']}: {m['content']}" for m in t["conversation"])
    lines += ["", f"**{conv}** (answer: {t['answer']})", "",
              f"- base, chat: {_quote(t['base_chat'])}", f"- base, few-shot: {_quote(t['base_few_shot'])}",
              f"- tuned: {_quote(t['tuned_chat'])}"]
  lines += ["", "Tuned model without its template:"]
  lines += [f"- {t['question']} -> {_quote(t['reply'])}" for t in r["no_template_transcripts"]]
  tm = r["timings"]
  lines += ["", f"Model: `{r['final_dir']}` (`python -m sample.chat --ckpt={r['final_dir']}`). Time: base "
            f"{tm['base_eval_s']:.0f} s, training {tm['train_s']:.0f} s, tuned {tm['tuned_eval_s']:.0f} s, total "
            f"{tm.get('total_s', 0):.0f} s. Plots: {', '.join(r.get('plots', []))}.", ""]
  return "\n".join(lines)


def _quote(text: str, limit: int = 160) -> str:
  t = text.replace("\n", " \\n ")
  return repr(t if len(t) <= limit else t[:limit] + "...")
