"""The bundled demo preference data: determinism, disjoint splits, checkable answers, the committed files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gemma_jax.data import LengthPolicy, demo_pairs, parse_preference, prepare_dataset
from gemma_jax.data.demo_facts import CAPITALS, DEFINITIONS
from gemma_jax.data.demo_pairs import build, is_correct, split_facts, to_jsonl
from gemma_jax.templates import get_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "data", "demo")


@pytest.fixture(scope="module")
def splits():
  return build()


def user_turns(record):
  p = record["prompt"]
  return [p] if isinstance(p, str) else [m["content"] for m in p if m["role"] == "user"]


def test_same_seed_same_bytes(tmp_path, splits):
  again = build()
  assert to_jsonl(again["train"]) == to_jsonl(splits["train"]) and to_jsonl(again["eval"]) == to_jsonl(splits["eval"])
  a = demo_pairs.write_demo_data(tmp_path / "a")
  b = demo_pairs.write_demo_data(tmp_path / "b")
  for pa, pb in zip(a, b):
    assert open(pa, "rb").read() == open(pb, "rb").read()
  assert to_jsonl(build(seed=1)["train"]) != to_jsonl(splits["train"])


def test_committed_files_are_what_the_generator_writes(splits):
  texts = {"train.jsonl": to_jsonl(splits["train"]), "eval.jsonl": to_jsonl(splits["eval"]),
           "README.md": demo_pairs.readme(splits)}
  for name in demo_pairs.FILES:
    with open(os.path.join(DEMO, name), encoding="utf-8", newline="") as f:
      assert f.read() == texts[name], f"data/demo/{name} is stale: run python tools/make_demo_data.py"
  assert f"version {demo_pairs.VERSION}" in texts["README.md"]


def test_script_writes_the_files(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"), f"--out={tmp_path}"],
                       capture_output=True, text=True, check=True).stdout
  assert out.count("wrote ") == 3
  for name in demo_pairs.FILES:
    assert open(tmp_path / name, "rb").read() == open(os.path.join(DEMO, name), "rb").read()


def test_sizes_and_coverage(splits):
  total = sum(len(r) for r in splits.values())
  assert 300 <= total <= 2000
  for name in ("train.jsonl", "eval.jsonl"):
    assert os.path.getsize(os.path.join(DEMO, name)) < 1_000_000
  for recs in splits.values():
    assert {r["type"] for r in recs} == set(demo_pairs.TYPES)
    assert {r["rejected_kind"] for r in recs} == {"wrong", "runon", "wrong_runon"}
    assert sum(r["turns"] == 2 for r in recs) >= 20
    assert len({r["id"] for r in recs}) == len(recs)
  assert len(CAPITALS) >= 60 and len(DEFINITIONS) >= 30


def test_eval_prompts_are_disjoint_from_training(splits):
  facts = split_facts()
  keys = {s: {f.key for fs in by.values() for f in fs} for s, by in facts.items()}
  assert not keys["train"] & keys["eval"]
  train_q = {q for r in splits["train"] for q in user_turns(r)}
  eval_q = {q for r in splits["eval"] for q in user_turns(r)}
  assert eval_q and not train_q & eval_q
  train_text = " ".join(train_q)
  eval_countries = {f.key.split(":", 1)[1] for f in facts["eval"]["capital"]}
  assert eval_countries and not any(f" {c}?" in train_text or f" {c}." in train_text for c in eval_countries)
  assert "decade" not in train_text and any("decade" in q for q in eval_q)


def test_chosen_is_correct_and_wrong_is_not(splits):
  for recs in splits.values():
    for r in recs:
      assert "\n" not in r["chosen"] and r["chosen"].endswith("."), r
      assert is_correct(r["chosen"], r["answer"]), r
      if r["rejected_kind"] == "wrong":
        assert "\n" not in r["rejected"] and not is_correct(r["rejected"], r["answer"]), r
      elif r["rejected_kind"] == "wrong_runon":
        head, tail = r["rejected"].split("\n", 1)
        assert not is_correct(head, r["answer"]) and tail.strip(), r
      else:
        assert r["rejected"].startswith(r["chosen"] + "\n"), r


def test_every_fact_reply_checks():
  for by in split_facts().values():
    for facts in by.values():
      for f in facts:
        assert all(is_correct(x, f.answer) for x in f.replies), f
        assert f.wrongs and not any(is_correct(x, f.answer) for x in f.wrongs), f


def test_definition_key_words_are_unique():
  for _, bare, _, key in DEFINITIONS:
    assert [d[1] for d in DEFINITIONS if is_correct(d[2], key)] == [bare]


def test_records_parse_and_tokenize(tiny_tokenizer, splits):
  g3 = get_template("gemma3")
  for split in ("train", "eval"):
    data = prepare_dataset(os.path.join(DEMO, f"{split}.jsonl"), kind="preference", template=g3,
                           tokenizer=tiny_tokenizer, policy=LengthPolicy(max_length=1024))
    assert not data.invalid and data.stats.kept == len(splits[split]) == data.stats.records
  two = next(r for r in splits["train"] if r["turns"] == 2)
  ex = parse_preference(two)
  assert [m["role"] for m in ex.prompt] == ["user", "assistant", "user"]
  assert ex.chosen == [{"role": "assistant", "content": two["chosen"]}]


@pytest.mark.parametrize("reply, answer, ok", [
    ("12", "12", True), ("It is 12.", "12", True), ("The answer is 12!", "12", True), ("12.0", "12", True),
    ("1,000 meters", "1000", True), ("1000", "1,000", True), ("2 + 10 = 12.", "12", True),
    ("112", "12", False), ("121", "12", False), ("1.2", "12", False), ("-12", "12", False), ("13", "12", False),
    ("12th", "12", False), ("5km", "5", False), ("The answer is -3.", "-3", True), ("20 - 8 = 12", "-8", False),
    ("paris.", "Paris", True), ("PARIS", "Paris", True), ("It's Paris, France.", "Paris", True),
    ("Parisian", "Paris", False), ("Bogotá is the capital.", "Bogota", True), ("Brasilia", "Brasília", True),
    ("New Delhi.", "New Delhi", True), ("Delhi", "New Delhi", False), ("new, delhi", "New Delhi", True),
    ("Delhi is new", "New Delhi", False), ("", "12", False),
])
def test_is_correct(reply, answer, ok):
  assert is_correct(reply, answer) is ok


def test_is_correct_refuses_an_empty_answer():
  with pytest.raises(ValueError):
    is_correct("anything", " . ")
