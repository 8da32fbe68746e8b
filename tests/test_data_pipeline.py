"""Preference and SFT examples: formats, rendering, truncation, batches, and every bad-input class."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from gemma_jax.data import (InvalidRecordsError, LengthPolicy, TokenizedPair, make_preference_batch,
                            make_sft_batch, parse_preference, parse_sft, prepare_dataset)
from gemma_jax.data.batching import bucket_for, length_buckets, pad_rows
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.templates import get_template

G3 = get_template("gemma3")


def u(text):
  return {"role": "user", "content": text}


def a(text):
  return {"role": "assistant", "content": text}


def write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
  return str(path)


def prep(tmp_path, records, tok, kind="preference", template=G3, name="d.jsonl", **kw):
  policy = kw.pop("policy", LengthPolicy(max_length=kw.pop("max_length", 256)))
  return prepare_dataset(write_jsonl(tmp_path / name, records), kind=kind, template=template, tokenizer=tok,
                         policy=policy, **kw)


# -- formats -----------------------------------------------------------------------------------------------

def test_preference_formats_agree(tmp_path, tiny_tokenizer):
  """Explicit strings, explicit message lists, implicit prompt and UltraFeedback rows give the same ids."""
  p, c, r = "how are you today?", "fine thanks!", "one two three"
  records = [
      {"prompt": p, "chosen": c, "rejected": r},
      {"prompt": [u(p)], "chosen": [a(c)], "rejected": [a(r)]},
      {"chosen": [u(p), a(c)], "rejected": [u(p), a(r)]},
      {"prompt": p, "prompt_id": "abc", "chosen": [u(p), a(c)], "rejected": [u(p), a(r)], "messages": [u(p), a(c)],
       "score_chosen": 8.0, "score_rejected": 3.5},
      {"prompt": [u(p)], "chosen": [u(p), {"role": "model", "content": c}], "rejected": [u(p), a(r)]},
  ]
  data = prep(tmp_path, records, tiny_tokenizer)
  assert len(data.examples) == 5
  first = data.examples[0]
  for ex in data.examples[1:]:
    for f in ("prompt", "chosen", "chosen_target", "rejected", "rejected_target"):
      np.testing.assert_array_equal(getattr(ex, f), getattr(first, f))
  # Independent check of the pieces against the template and the tokenizer.
  tok = tiny_tokenizer
  assert first.prompt.tolist() == G3.render_prompt([u(p)], tok)
  assert first.chosen.tolist() == tok.encode(c) + [tok.special.end_of_turn] + tok.encode("\n")
  assert first.chosen_target.tolist() == [True] * (len(tok.encode(c)) + 1) + [False]
  assert [e.where for e in data.examples] == [f"{tmp_path}/d.jsonl:{i}" for i in range(1, 6)]


def test_ultrafeedback_parquet_unchanged(tmp_path, tiny_tokenizer):
  """The HF ultrafeedback_binarized schema (message lists as list<struct>), read from Parquet as is."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{"prompt": p, "prompt_id": f"id{i}", "chosen": [u(p), a(c)], "rejected": [u(p), a(r)],
           "messages": [u(p), a(c)], "score_chosen": 9.0, "score_rejected": 2.5}
          for i, (p, c, r) in enumerate([("hello", "hello world", "one two"), ("how are you ?", "fine", "no")])]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train_prefs.parquet")
  data = prepare_dataset(tmp_path / "train_prefs.parquet", kind="preference", template=G3, tokenizer=tiny_tokenizer,
                         policy=LengthPolicy(max_length=128))
  ex = data.examples[1]
  assert ex.where.endswith("train_prefs.parquet:2")
  assert ex.prompt.tolist() == G3.render_prompt([u("how are you ?")], tiny_tokenizer)
  assert tiny_tokenizer.decode(ex.chosen[ex.chosen_target]) == "fine<end_of_turn>"


def test_implicit_prompt_multi_turn():
  ex = parse_preference({"chosen": [u("a"), a("b"), u("c"), a("good")], "rejected": [u("a"), a("b"), u("c"), a("bad")]})
  assert ex.prompt == [u("a"), a("b"), u("c")] and ex.chosen == [a("good")] and ex.rejected == [a("bad")]
  # Replies diverging before the last turn: the prompt stops at the last shared user turn.
  ex = parse_preference({"chosen": [u("a"), a("b1"), u("c"), a("d")], "rejected": [u("a"), a("b2"), u("c"), a("d")]})
  assert ex.prompt == [u("a")] and ex.chosen == [a("b1"), u("c"), a("d")]


def test_sft_formats(tmp_path, tiny_tokenizer):
  tok = tiny_tokenizer
  conv = [u("hello"), a("hello world"), u("how are you?"), a("fine thanks!")]
  data = prep(tmp_path, [{"messages": conv}, {"prompt": conv[:3], "completion": conv[3:]},
                         {"prompt": "hello", "completion": "hello world"}], tok, kind="sft")
  full, pc, simple = data.examples
  ids, mask = G3.render_training(conv, tok)
  assert full.ids.tolist() == ids and full.target.tolist() == mask  # every reply is a target
  ids3, mask3 = G3.render_training(conv, tok, train_from=3)
  assert pc.ids.tolist() == ids3 and pc.target.tolist() == mask3 and sum(mask3) < sum(mask)
  assert simple.ids.tolist() == G3.render_training(conv[:2], tok)[0]
  last = prep(tmp_path, [{"messages": conv}], tok, kind="sft", train_on="last", name="l.jsonl").examples[0]
  assert last.target.tolist() == mask3


def test_completion_template_targets_eos_by_default(tmp_path, tiny_tokenizer):
  tok = tiny_tokenizer
  data = prep(tmp_path, [{"prompt": "the capital of france is", "completion": " paris ."}], tok, kind="sft",
              template=get_template("completion"))
  ex = data.examples[0]
  assert ex.ids.tolist() == ([tok.special.bos] + tok.encode("the capital of france is") + tok.encode(" paris .")
                             + [tok.special.eos])
  assert ex.target[-1] and ex.ids[-1] == tok.special.eos


def test_base_model_learns_to_stop_targets(tmp_path, tiny_tokenizer):
  """Base-to-chat: each reply's targets end with <end_of_turn>, and with eos_target also with eos."""
  tok = tiny_tokenizer
  rec = {"prompt": "hello", "chosen": "hello world", "rejected": "one two"}
  for eos_target, tail in ((False, [tok.special.end_of_turn]), (True, [tok.special.end_of_turn, tok.special.eos])):
    ex = prep(tmp_path, [rec], tok, eos_target=eos_target, name=f"{eos_target}.jsonl").examples[0]
    for ids, target in ((ex.chosen, ex.chosen_target), (ex.rejected, ex.rejected_target)):
      assert ids[target].tolist()[-len(tail):] == tail
    batch = make_preference_batch([ex], 64)
    for row in range(2):
      targets = batch["tokens"][row][batch["target_mask"][row]].tolist()
      assert targets[-len(tail):] == tail


# -- bad input: one class per test row ---------------------------------------------------------------------

BAD_PREFERENCE = [
    ('{"prompt": "x", "chosen": "y"', "broken JSON"),
    ({"prompt": "x", "rejected": "y"}, "missing field 'chosen'"),
    ({"prompt": "x", "chosen": None, "rejected": "y"}, "missing field 'chosen'"),
    ({"chosen": "y", "rejected": "z"}, "missing field 'prompt'"),
    ({"prompt": "x", "chosen": "", "rejected": "y"}, "field 'chosen' is empty"),
    ({"prompt": "  \n", "chosen": "y", "rejected": "z"}, "field 'prompt' is empty"),
    ({"prompt": "x", "chosen": [], "rejected": []}, "field 'chosen' is empty"),
    ({"prompt": [u("x"), a(" ")], "chosen": "y", "rejected": "z"}, r"prompt\[1\].content is empty"),
    ({"prompt": "x", "chosen": 3, "rejected": "y"}, "both be strings or both be message lists"),
    ({"prompt": "x", "chosen": [3], "rejected": [3]}, r"chosen\[0\] must be an object"),
    ({"prompt": "x", "chosen": [{"role": "assistant", "content": 5}], "rejected": "y"}, "both be strings"),
    ({"prompt": "x", "chosen": [{"role": "assistant", "content": 5}], "rejected": [a("y")]},
     r"chosen\[0\].content must be a string, got a number"),
    ({"prompt": 7, "chosen": "y", "rejected": "z"}, "'prompt' must be a string or a list"),
    ({"prompt": "x", "chosen": [{"role": "bot", "content": "y"}], "rejected": [a("z")]}, "role must be one of"),
    ({"prompt": "x", "chosen": [{"content": "y"}], "rejected": [a("z")]}, r"chosen\[0\] has no 'role'"),
    ({"prompt": [u("x"), u("y")], "chosen": "y", "rejected": "z"}, "roles do not alternate"),
    ({"chosen": [u("x"), u("y"), a("z")], "rejected": [u("x"), u("y"), a("w")]}, "roles do not alternate"),
    ({"prompt": [u("x"), a("y")], "chosen": "y", "rejected": "z"}, "the prompt must end with a user message"),
    ({"prompt": "x", "chosen": [a("y"), a("z")], "rejected": [a("w")]}, "roles do not alternate"),
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "x", "chosen": " same\n", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"chosen": [u("x"), a("y")], "rejected": [u("other"), a("z")]}, "share no user turn"),
    ({"prompt": "not it", "chosen": [u("x"), a("y")], "rejected": [u("x"), a("z")]}, "'prompt' does not match"),
    ({"prompt": "x", "chosen": "a <end_of_turn> b", "rejected": "z"}, "control text '<end_of_turn>'"),
    ('{"prompt": "lone \\ud800", "chosen": "y", "rejected": "z"}', "field 'prompt' is not valid UTF-8"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("record,message", BAD_PREFERENCE, ids=[m for _, m in BAD_PREFERENCE])
def test_bad_preference_record(tmp_path, tiny_tokenizer, record, message):
  good = {"prompt": "hello", "chosen": "hello world", "rejected": "one two"}
  path = write_jsonl(tmp_path / "d.jsonl", [good, record, good])
  policy = LengthPolicy(max_length=256)
  with pytest.raises(InvalidRecordsError) as e:
    prepare_dataset(path, kind="preference", template=G3, tokenizer=tiny_tokenizer, policy=policy)
  lines = str(e.value).splitlines()
  assert lines[0].startswith(f"{path}:2: ") and len(lines) == 2, lines
  assert re.search(message, lines[0]), lines[0]
  assert lines[1] == (f"1 malformed record(s) in {path}; fix them, or skip them with "
                      "--config.data.skip_invalid=true (training) or --skip_invalid (inspect)")
  data = prepare_dataset(path, kind="preference", template=G3, tokenizer=tiny_tokenizer, policy=policy,
                         skip_invalid=True)
  assert len(data.examples) == 2 and data.stats.invalid == 1 and data.stats.records == 3


def test_non_utf8_bytes(tmp_path, tiny_tokenizer):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n{"prompt": "x", "chosen": "a", '
                   b'"rejected": "b"}\n')
  with pytest.raises(InvalidRecordsError, match=rf"{path}:1: not valid UTF-8 \(byte 0xe9"):
    prepare_dataset(path, kind="preference", template=G3, tokenizer=tiny_tokenizer, policy=LengthPolicy(64))


def test_template_rules_are_record_errors(tmp_path, tiny_tokenizer):
  """A system message is fine for Gemma 3 but a per-record error for Gemma 1/2."""
  rec = {"chosen": [{"role": "system", "content": "be brief"}, u("x"), a("y")],
         "rejected": [{"role": "system", "content": "be brief"}, u("x"), a("z")]}
  assert len(prep(tmp_path, [rec], tiny_tokenizer).examples) == 1
  with pytest.raises(InvalidRecordsError, match=r"d.jsonl:1: .*no system role"):
    prep(tmp_path, [rec], tiny_tokenizer, template=get_template("gemma"))


BAD_SFT = [
    ({"text": "x"}, "missing field 'messages'"),
    ({"messages": "hello"}, "must be a list of messages"),
    ({"messages": [u("x")]}, "must end with an assistant reply"),
    ({"messages": [u("x"), a("y"), a("z")]}, "roles do not alternate"),
    ({"messages": [a("y")]}, "roles do not alternate"),
    ({"prompt": "x"}, "missing field 'completion'"),
    ({"prompt": "x", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": "x", "completion": 1.5}, "must be a string or a list of messages, got a number"),
]


@pytest.mark.parametrize("record,message", BAD_SFT, ids=[m for _, m in BAD_SFT])
def test_bad_sft_record(tmp_path, tiny_tokenizer, record, message):
  with pytest.raises(InvalidRecordsError, match=rf"d.jsonl:2: .*{message}"):
    prep(tmp_path, [{"prompt": "x", "completion": "y"}, record], tiny_tokenizer, kind="sft")


def test_all_malformed_records_are_listed_before_failing(tmp_path, tiny_tokenizer):
  recs = [{"prompt": "x", "chosen": "y", "rejected": "y"}] * 3 + [{"prompt": "x", "chosen": "y", "rejected": "z"}]
  with pytest.raises(InvalidRecordsError) as e:
    prep(tmp_path, recs, tiny_tokenizer)
  assert [i.where.rsplit(":", 1)[1] for i in e.value.invalid] == ["1", "2", "3"]
  with pytest.raises(DataError, match="no usable examples"):
    prep(tmp_path, recs[:3], tiny_tokenizer, skip_invalid=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
  """A SentencePiece model without Gemma's turn markers (<start_of_turn>, <end_of_turn>)."""
  import io
  import sentencepiece as spm
  from gemma_jax.tokenizer import Tokenizer
  out = io.BytesIO()
  lines = [f"hello world how are you today {i} fine thanks one two three" for i in range(50)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=60, model_type="bpe",
                                 pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
  return Tokenizer(out.getvalue())


def test_tokenizer_without_turn_tokens_is_refused_once(tmp_path, plain_tokenizer):
  """Not as "48 malformed records": the template needs tokens that the tokenizer does not have."""
  recs = [{"prompt": "hello", "chosen": "fine thanks", "rejected": "one two"}] * 48
  for name, want in [(None, "the tokenizer (60 pieces)"), ("plain.model", "plain.model")]:
    with pytest.raises(ConfigError) as e:
      prep(tmp_path, recs, plain_tokenizer, tokenizer_name=name)
    assert str(e.value) == (f"{want} has no <start_of_turn>, <end_of_turn> tokens, which the 'gemma3' template "
                            "needs; use a Gemma tokenizer (or the completion template)")
  data = prep(tmp_path, recs, plain_tokenizer, template=get_template("completion"))  # needs only bos and eos
  assert len(data.examples) == 48


def test_workers_give_the_same_result(tmp_path, tiny_tokenizer):
  recs = [{"prompt": f"hello {i}", "chosen": "hello world " * (i % 7 + 1), "rejected": "one two"} for i in range(1100)]
  recs[5] = {"prompt": "x", "chosen": "same", "rejected": "same"}
  kw = dict(max_length=40, skip_invalid=True)
  one = prep(tmp_path, recs, tiny_tokenizer, **kw)
  two = prep(tmp_path, recs, tiny_tokenizer, num_workers=2, **kw)
  assert one.stats.to_dict() == two.stats.to_dict() and one.stats.dropped_response_too_long > 0
  assert [str(i) for i in one.invalid] == [str(i) for i in two.invalid] and len(one.invalid) == 1
  assert len(one.examples) == len(two.examples) > 100
  for x, y in zip(one.examples, two.examples):
    assert x.where == y.where
    for f in ("prompt", "chosen", "chosen_target", "rejected", "rejected_target"):
      np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


# -- truncation ----------------------------------------------------------------------------------------------

def test_prompt_truncation_keeps_bos_and_generation_prompt(tmp_path, tiny_tokenizer):
  tok = tiny_tokenizer
  long_prompt = " ".join(["one two three four five"] * 10)
  rec = {"prompt": long_prompt, "chosen": "fine", "rejected": "thanks"}
  full = G3.render_prompt([u(long_prompt)], tok)
  gen = G3.generation_prompt(tok)
  for mode in ("keep_end", "keep_start"):
    policy = LengthPolicy(max_length=64, max_prompt_length=20, prompt_truncation=mode)
    data = prep(tmp_path, [rec], tok, policy=policy, name=f"{mode}.jsonl")
    p = data.examples[0].prompt.tolist()
    assert len(p) == 20 and p[0] == tok.special.bos and p[-len(gen):] == gen and p.count(tok.special.bos) == 1
    body = 20 - 1 - len(gen)
    want = full[1:1 + body] if mode == "keep_start" else full[len(full) - len(gen) - body:len(full) - len(gen)]
    assert p[1:1 + body] == want
    assert data.stats.truncated_prompts == 1


def test_drops_and_budget(tmp_path, tiny_tokenizer):
  tok = tiny_tokenizer
  prompt_len = len(G3.render_prompt([u("hello")], tok))
  long = " ".join(["one two three"] * 8)
  n_long = len(tok.encode(long)) + 2  # + <end_of_turn> and the newline
  recs = [{"prompt": " ".join(["hello"] * 40), "chosen": "a", "rejected": "b"},  # prompt alone does not fit
          {"prompt": "hello", "chosen": long, "rejected": "fine"},               # chosen does not fit
          {"prompt": "hello", "chosen": "fine", "rejected": "thanks"}]
  max_length = prompt_len + n_long - 3
  data = prep(tmp_path, recs, tok, max_length=max_length)
  s = data.stats
  assert (s.kept, s.dropped_prompt_too_long, s.dropped_response_too_long, s.truncated_responses) == (1, 1, 1, 0)
  # Asked to cut: the long response is cut to max_length - len(prompt) and counted; its end_of_turn is gone;
  # the short one is untouched (the budget is per response, not max_length - longer response).
  cut = prep(tmp_path, recs[1:2], tok, policy=LengthPolicy(max_length, response_truncation="cut"), name="c.jsonl")
  ex = cut.examples[0]
  assert len(ex.chosen) == max_length - prompt_len and tok.special.end_of_turn not in ex.chosen.tolist()
  assert ex.rejected.tolist() == tok.encode("fine") + [tok.special.end_of_turn] + tok.encode("\n")
  assert cut.stats.truncated_responses == 1
  # Only the trailing newline (not a target) over the budget: kept, not counted.
  tight = prep(tmp_path, recs[1:2], tok, max_length=prompt_len + n_long - 1, name="t.jsonl")
  assert tight.stats.kept == 1 and tight.stats.truncated_responses == 0
  assert tight.examples[0].chosen.tolist()[-1] == tok.special.end_of_turn


def test_length_policy_validation():
  with pytest.raises(ConfigError, match="max_prompt_length"):
    LengthPolicy(max_length=10, max_prompt_length=10)
  with pytest.raises(ConfigError, match="prompt_truncation"):
    LengthPolicy(max_length=10, prompt_truncation="middle")
  with pytest.raises(ConfigError, match="response_truncation"):
    LengthPolicy(max_length=10, response_truncation="silently")


# -- batches ------------------------------------------------------------------------------------------------

def pair(prompt, chosen, chosen_target, rejected, rejected_target):
  arr = lambda x, t=np.int32: np.asarray(x, t)  # noqa: E731
  return TokenizedPair("x:1", arr(prompt), arr(chosen), arr(chosen_target, bool), arr(rejected),
                       arr(rejected_target, bool))


def test_preference_batch_exact():
  # pad id 0 and eos 1 appear as real targets: padding is told by the mask, never by the id.
  p1 = pair([2, 5, 6], [7, 0, 106, 1], [1, 1, 1, 1], [8, 106], [1, 1])
  p2 = pair([2, 9], [10, 106, 107], [1, 1, 0], [11, 12, 13, 106, 107], [1, 1, 1, 1, 0])
  b = make_preference_batch([p1, p2], 8)
  np.testing.assert_array_equal(b["tokens"], [[2, 5, 6, 7, 0, 106, 1, 0], [2, 9, 10, 106, 107, 0, 0, 0],
                                              [2, 5, 6, 8, 106, 0, 0, 0], [2, 9, 11, 12, 13, 106, 107, 0]])
  np.testing.assert_array_equal(b["input_mask"].astype(int), [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0],
                                                              [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(b["target_mask"].astype(int), [[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0, 0],
                                                               [0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]])
  # TRL's NLL: every real token of the chosen rows but the first; nothing on rejected rows.
  np.testing.assert_array_equal(b["nll_mask"].astype(int), [[0, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0],
                                                            [0] * 8, [0] * 8])
  resp = make_preference_batch([p1, p2], 8, nll_target="response")
  np.testing.assert_array_equal(resp["nll_mask"][:2], b["target_mask"][:2])
  assert not resp["nll_mask"][2:].any()
  assert b["tokens"].dtype == np.int32 and b["input_mask"].dtype == bool and not b["target_mask"][:, 0].any()


def test_sft_batch_and_packing():
  from gemma_jax.data import TokenizedSequence
  seq = lambda ids, tgt: TokenizedSequence("x", np.asarray(ids, np.int32), np.asarray(tgt, bool))  # noqa: E731
  s1, s2 = seq([2, 5, 6, 7], [0, 0, 1, 1]), seq([2, 8, 9], [0, 1, 1])
  b = make_sft_batch([s1, s2], 6)
  assert set(b) == {"tokens", "input_mask", "target_mask"}
  np.testing.assert_array_equal(b["target_mask"].astype(int), [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
  packed = pad_rows([[(s1.ids, s1.target, s1.target), (s2.ids, s2.target, s2.target)]], 8, packed=True)
  np.testing.assert_array_equal(packed["tokens"], [[2, 5, 6, 7, 2, 8, 9, 0]])
  np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0]])
  np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 3, 0, 1, 2, 0]])
  np.testing.assert_array_equal(packed["target_mask"].astype(int), [[0, 0, 1, 1, 0, 1, 1, 0]])
  np.testing.assert_array_equal(packed["input_mask"].astype(int), [[1, 1, 1, 1, 1, 1, 1, 0]])


def test_buckets():
  assert length_buckets(1000) == (64, 128, 256, 512, 1000)
  assert length_buckets(512, min_length=128) == (128, 256, 512)
  assert bucket_for(65, length_buckets(1000)) == 128 and bucket_for(1000, length_buckets(1000)) == 1000
  with pytest.raises(ConfigError):
    bucket_for(1001, length_buckets(1000))
