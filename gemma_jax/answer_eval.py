"""Answers to checkable questions: does a model's reply end its turn, is its first line right, how long is it.

    ev = evaluate_answers(sampler, records, chat=ChatTemplate("gemma3"), max_new_tokens=48)
    ev.summary()    # {"examples": 167, "stop_rate": 0.98, "accuracy": 0.42, "mean_reply_tokens": 9.1}
    shots = few_shot_examples(train_records)                    # one short solved question per type
    fs = evaluate_answers(sampler, records, few_shot=shots, max_new_tokens=48)   # a base model's fairest setting

Records are demo-style preference records (`gemma_jax.data.demo_pairs`): `prompt` is a question, or messages
ending with a user question; `answer` is what `is_correct` looks for. Two settings:
- chat: the prompt rendered with a chat template (the model's turn opened), greedy, stopped by the template's
  stop ids (end of turn, eos). "Stopped" = the reply ended with one of them within `max_new_tokens`.
- few-shot completion: "Question: ...\\nAnswer: ..." examples, then the question; the reply is the rest of the
  answer line (stopped at a newline). No turn to end, so it has no stop rate: only accuracy.
Accuracy is `is_correct` on the reply's first line in both, so a base model's run-on text ("...\\nQuestion:
...") cannot add right answers by chance.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from gemma_jax.data.demo_pairs import TYPES, is_correct
from gemma_jax.sampling.engine import Sampler
from gemma_jax.sampling.strategies import SamplingParams
from gemma_jax.templates import ChatTemplate

FEW_SHOT = "Question: {question}\nAnswer: {answer}\n\n"  # one solved example of the few-shot prompt


@dataclasses.dataclass(frozen=True)
class Answer:
  """One held-out question: the reply text (cut at the stop), its token count, whether it ended with a stop
  token (chat) or at the end of the answer line (few-shot), and whether its first line is right."""

  id: str
  question: str  # the last user message
  reply: str
  reply_tokens: int
  stopped: bool
  correct: bool | None  # None: the record has no `answer` to check


@dataclasses.dataclass(frozen=True)
class AnswerEval:
  setting: str  # "chat" or "few-shot"
  answers: tuple[Answer, ...]

  def summary(self) -> dict[str, Any]:
    """examples; stop_rate (chat only); accuracy (of the records with an `answer`); mean_reply_tokens."""
    n = max(len(self.answers), 1)
    out: dict[str, Any] = {"examples": len(self.answers)}
    if self.setting == "chat":
      out["stop_rate"] = sum(a.stopped for a in self.answers) / n
    checked = [a.correct for a in self.answers if a.correct is not None]
    if checked:
      out["accuracy"] = sum(checked) / len(checked)
    out["mean_reply_tokens"] = sum(a.reply_tokens for a in self.answers) / n
    return out


def messages_of(record: dict[str, Any]) -> list[dict[str, str]]:
  """The record's prompt as messages (a string prompt is one user message)."""
  p = record["prompt"]
  return [{"role": "user", "content": p}] if isinstance(p, str) else [dict(m) for m in p]


def first_line(text: str) -> str:
  return text.strip().split("\n", 1)[0].strip()


def few_shot_examples(records: Sequence[dict[str, Any]], per_type: int = 1) -> list[tuple[str, str]]:
  """(question, correct reply) from the first single-turn records of each type, in `TYPES` order."""
  out = []
  for t in TYPES:
    out += [(r["prompt"], r["chosen"]) for r in records
            if r.get("type") == t and isinstance(r["prompt"], str)][:per_type]
  return out


def few_shot_prompt(record: dict[str, Any], shots: Sequence[tuple[str, str]]) -> str:
  """The solved examples, the record's earlier turns in the same form, then its question and "Answer:"."""
  msgs = messages_of(record)
  solved = list(shots) + [(q["content"], a["content"]) for q, a in zip(msgs[:-1:2], msgs[1::2])]
  head = "".join(FEW_SHOT.format(question=q, answer=a) for q, a in solved)
  return head + f"Question: {msgs[-1]['content']}\nAnswer:"


def evaluate_answers(sampler: Sampler, records: Sequence[dict[str, Any]], *, chat: ChatTemplate | None = None,
                     few_shot: Sequence[tuple[str, str]] | None = None, max_new_tokens: int = 48,
                     batch_size: int = 16, progress: str | None = None) -> AnswerEval:
  """Greedy replies to every record, in the chat setting (`chat`, a template) or few-shot (`few_shot`, the
  solved examples); exactly one of the two. `progress`: a progress bar with that label."""
  if (chat is None) == (few_shot is None):
    raise ValueError("evaluate_answers: give exactly one of chat= and few_shot=")
  tok = sampler.tokenizer
  if chat is not None:
    rows = [chat.render_prompt(messages_of(r), tok) for r in records]
    stop = dict(stop_ids=chat.stop_token_ids(tok))
  else:
    rows = [tok.encode(few_shot_prompt(r, few_shot), add_bos=True) for r in records]
    stop = dict(stop_ids=[tok.special.eos], stop_strings=("\n",))
  out = sampler.generate(rows, max_new_tokens=max_new_tokens, sampling=SamplingParams(), batch_size=batch_size,
                         progress=progress, **stop)
  answers = []
  for r, c in zip(records, out):
    stopped = c.stop_reason != "length"
    answers.append(Answer(id=str(r.get("id", "")), question=messages_of(r)[-1]["content"], reply=c.text.strip(),
                          reply_tokens=len(c.tokens), stopped=stopped,
                          correct=is_correct(first_line(c.text), r["answer"]) if r.get("answer") else None))
  return AnswerEval("chat" if chat is not None else "few-shot", tuple(answers))
