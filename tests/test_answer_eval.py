"""gemma_jax.answer_eval: the prompts of both settings, first-line accuracy, the stop rate, on a tiny model whose
replies are checked against the sampler's own completions."""

from __future__ import annotations

import jax
import pytest

from helpers import tiny_config
from gemma_jax.answer_eval import (AnswerEval, Answer, evaluate_answers, few_shot_examples, few_shot_prompt,
                                   first_line, messages_of)
from gemma_jax.model import init_params
from gemma_jax.sampling import Sampler, SamplingParams
from gemma_jax.templates import ChatTemplate

RECORDS = [
    {"id": "a", "prompt": "the capital of france", "answer": "paris", "type": "capital", "chosen": "paris ."},
    {"id": "b", "prompt": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"},
                           {"role": "user", "content": "four five"}], "answer": "six", "type": "arithmetic",
     "chosen": "six ."},
    {"id": "c", "prompt": "how are you", "type": "definition", "chosen": "fine thanks"},  # no answer to check
]


def test_few_shot_prompt_puts_earlier_turns_in_the_same_form():
  shots = [("q1", "a1."), ("q2", "a2.")]
  assert few_shot_prompt(RECORDS[0], shots) == ("Question: q1\nAnswer: a1.\n\nQuestion: q2\nAnswer: a2.\n\n"
                                                "Question: the capital of france\nAnswer:")
  assert few_shot_prompt(RECORDS[1], []) == "Question: one two\nAnswer: three\n\nQuestion: four five\nAnswer:"


def test_few_shot_examples_take_single_turn_records_by_type():
  recs = [RECORDS[1], {**RECORDS[0], "prompt": "x"}, RECORDS[0], {**RECORDS[2], "type": "unit"}]
  assert few_shot_examples(recs) == [("x", "paris ."), ("how are you", "fine thanks")]
  assert few_shot_examples(recs, per_type=2) == [("x", "paris ."), ("the capital of france", "paris ."),
                                                 ("how are you", "fine thanks")]


def test_first_line_and_summary():
  assert first_line("  It is 12.\nQuestion: what is 3 + 4?") == "It is 12."
  answers = (Answer("a", "q", "r", 4, True, True), Answer("b", "q", "r", 8, False, False),
             Answer("c", "q", "r", 6, True, None))
  s = AnswerEval("chat", answers).summary()
  assert s == {"examples": 3, "stop_rate": pytest.approx(2 / 3), "accuracy": 0.5, "mean_reply_tokens": 6.0}
  assert "stop_rate" not in AnswerEval("few-shot", answers).summary()


@pytest.fixture(scope="module")
def sampler(tiny_tokenizer):
  config = tiny_config("gemma3", num_layers=2, vocab_size=tiny_tokenizer.vocab_size, embed_dim=32, hidden_dim=64,
                       head_dim=8, query_pre_attn_scalar=8)
  return Sampler(config, init_params(config, jax.random.key(3)), tiny_tokenizer, packed=False)


def test_chat_setting_matches_the_sampler_on_the_template_prompt(sampler, tiny_tokenizer):
  template = ChatTemplate("gemma3")
  ev = evaluate_answers(sampler, RECORDS, chat=template, max_new_tokens=6, batch_size=2)
  rows = [template.render_prompt(messages_of(r), tiny_tokenizer) for r in RECORDS]
  ref = sampler.generate(rows, max_new_tokens=6, sampling=SamplingParams(),
                         stop_ids=template.stop_token_ids(tiny_tokenizer))
  assert ev.setting == "chat" and [a.id for a in ev.answers] == ["a", "b", "c"]
  for a, c in zip(ev.answers, ref):
    assert a.reply == c.text.strip() and a.reply_tokens == len(c.tokens)
    assert a.stopped == (c.stop_reason == "stop_id")
  assert ev.answers[1].question == "four five" and ev.answers[2].correct is None


def test_few_shot_setting_ends_at_the_answer_line(sampler, tiny_tokenizer):
  ev = evaluate_answers(sampler, RECORDS[:2], few_shot=[("one", "two")], max_new_tokens=12)
  for a, r in zip(ev.answers, RECORDS):
    assert "\n" not in a.reply
    prompt = tiny_tokenizer.encode(few_shot_prompt(r, [("one", "two")]), add_bos=True)
    ref = sampler.generate([prompt], max_new_tokens=12, stop_ids=[tiny_tokenizer.special.eos],
                           stop_strings=("\n",))[0]
    assert a.reply == ref.text.strip() and a.stopped == (ref.stop_reason != "length")
  with pytest.raises(ValueError):
    evaluate_answers(sampler, RECORDS, max_new_tokens=4)
