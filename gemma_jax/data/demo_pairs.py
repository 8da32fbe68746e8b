"""The bundled demo preference data: checkable questions, a correct one-sentence chosen reply, a bad rejected one.

    splits = build()                 # {"train": [record, ...], "eval": [record, ...]}, the same for the same seed
    write_demo_data("data/demo")     # train.jsonl, eval.jsonl, README.md (what `tools/make_demo_data.py` runs)
    is_correct("It is 12.", "12")    # True; is_correct("112", "12") is False

A record is a preference record as `data/preference.py` reads it (the extra fields are ignored there):
  prompt         a question (str), or for two-turn records a list of messages: user question, the model's
                 correct short answer, a second user question
  chosen         the correct reply, one sentence; the chat template ends the turn after it
  rejected       `rejected_kind` "wrong": a plausible wrong value; "runon": the correct reply, then the text a
                 base model goes on with ("\\nQuestion: ...", "\\nUser: ..."); "wrong_runon": both faults (its
                 first line is the wrong reply)
  type           arithmetic | capital | unit | definition (of the last question)
  answer         the canonical answer `is_correct` checks ("12", "Paris"; for a definition, its key word)
  turns, id      1 or 2 user turns; "train-0001"
Facts (numbers, countries, terms, unit amounts) are split first, so no eval question is asked in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import unicodedata

from gemma_jax.data.demo_facts import CAPITALS, DEFINITIONS, UNITS

VERSION = 1  # bump when the generated records change; README.md records it
SEED = 0
FILES = ("train.jsonl", "eval.jsonl", "README.md")
TYPES = ("arithmetic", "capital", "unit", "definition")
# Records per split: facts asked once (arithmetic, units) or several times in other phrasings (capitals, terms).
COUNTS = {"train": {"add": 130, "sub": 110, "mul": 48, "unit": 180, "two_turn": 200},
          "eval": {"add": 25, "sub": 20, "mul": 12, "unit": 40, "two_turn": 30}}
HELD_OUT = {"capital": 13, "definition": 7}  # countries / terms only in eval
REPEATS = {"train": 4, "eval": 2}  # records per country or term
EVAL_ONLY_UNIT = "decade"  # a conversion never seen in training


@dataclasses.dataclass(frozen=True)
class Fact:
  type: str
  key: str  # unique per fact; the splits share none
  answer: str
  questions: tuple[str, ...]
  replies: tuple[str, ...]  # correct, one sentence each
  wrongs: tuple[str, ...]  # wrong, one sentence each (none passes is_correct)


# -- checking ------------------------------------------------------------------------------------------------

# A number (with its sign when "-" stands alone before it, and any letters glued to it: "12th" is not "12"),
# or a word.
_TOKEN = re.compile(r"(?:(?<!\w)-)?\d+(?:\.\d+)?[^\W_]*|[^\W\d_]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _tokens(text: str) -> list[str]:
  """Lower-case words and numbers; accents, punctuation and thousands separators dropped ("1,000" -> "1000")."""
  text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
  text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
  out = []
  for t in _TOKEN.findall(text):
    if _NUMBER.fullmatch(t):  # "12.0" == "12", "007" == "7"
      sign, t = ("-", t[1:]) if t[0] == "-" else ("", t)
      if "." in t:
        t = t.rstrip("0").rstrip(".")
      t = sign + (t.lstrip("0") or "0")
    out.append(t)
  return out


def is_correct(reply: str, answer: str) -> bool:
  """Whether `answer` occurs in `reply` as whole tokens: case, accents, punctuation and the words around it do
  not matter; the value does ("12" matches "It is 12." and "12.0", not "112", "1.2", "-12" or "12th";
  "New Delhi" needs both words in order). It checks presence only: a reply that repeats the question's
  numbers, or goes on with other answers, can contain the answer by chance."""
  want = _tokens(answer)
  if not want:
    raise ValueError(f"answer {answer!r} has no words or numbers to check")
  got = _tokens(reply)
  n = len(want)
  return any(got[i:i + n] == want for i in range(len(got) - n + 1))


# -- facts -----------------------------------------------------------------------------------------------

def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _fact(type_, key, answer, questions, replies, wrongs) -> Fact:
  wrongs = tuple(w for w in dict.fromkeys(wrongs) if not is_correct(w, answer))
  assert replies and wrongs and all(is_correct(r, answer) for r in replies), key
  return Fact(type_, key, answer, tuple(questions), tuple(replies), wrongs)


_ARITH = {  # op: (symbol, word, question templates, the value, wrong values)
    "add": ("+", "plus", ("What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.",
                          "How much is {a} plus {b}?", "What do you get when you add {a} and {b}?", "{a} + {b} = ?"),
            lambda a, b: a + b, lambda a, b, c: (c + 1, c - 1, c + 2, c + 10, a * b)),
    "sub": ("-", "minus", ("What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}.",
                           "What do you get when you subtract {b} from {a}?", "{a} - {b} = ?",
                           "How much is {a} minus {b}?"),
            lambda a, b: a - b, lambda a, b, c: (c + 1, c - 1, c + 2, a + b, c + 10)),
    "mul": ("x", "times", ("What is {a} x {b}?", "What is {a} times {b}?", "What is {a} multiplied by {b}?",
                           "Calculate {a} * {b}.", "{a} x {b} = ?", "How much is {a} times {b}?"),
            lambda a, b: a * b, lambda a, b, c: (c + a, c - b, c + 1, a + b, c + 10)),
}
_ARITH_REPLIES = ("{a} {sym} {b} = {c}.", "The answer is {c}.", "{c}.", "{a} {word} {b} is {c}.", "It is {c}.")


def _arithmetic(op: str, a: int, b: int) -> Fact:
  sym, word, questions, value, wrong_values = _ARITH[op]
  c = value(a, b)
  fill = lambda t, c: t.format(a=a, b=b, c=c, sym=sym, word=word)  # noqa: E731
  wrongs = [fill(t, w) for w in wrong_values(a, b, c) if w > 0 and w != c for t in _ARITH_REPLIES]
  return _fact("arithmetic", f"{op}:{a},{b}", str(c), [fill(q, c) for q in questions],
               [fill(t, c) for t in _ARITH_REPLIES], wrongs)


def _arithmetic_keys() -> dict[str, list[tuple[int, int]]]:
  """Operand pairs; for + and x one order per pair (3 + 5 and 5 + 3 are one fact)."""
  return {"add": [(a, b) for a in range(2, 26) for b in range(a, 26)],
          "sub": [(a, b) for a in range(3, 31) for b in range(2, a)],
          "mul": [(a, b) for a in range(2, 13) for b in range(a, 13)]}


_CAPITAL_Q = ("What is the capital of {c}?", "What is the capital city of {c}?", "Which city is the capital of {c}?",
              "Name the capital of {c}.", "What city is the capital of {c}?", "Tell me the capital of {c}.")
_CAPITAL_R = ("The capital of {c} is {x}.", "{x} is the capital of {c}.", "{x}.", "It is {x}.")


def _capital(i: int, rng: random.Random) -> Fact:
  country, capital, confusion = CAPITALS[i]
  others = [x for j, (_, x, _) in enumerate(CAPITALS) if j != i]
  wrong_cities = [confusion or rng.choice(others), rng.choice(others)]
  fill = lambda t, x: _cap(t.format(c=country, x=x))  # noqa: E731
  return _fact("capital", f"capital:{country}", capital, [fill(q, capital) for q in _CAPITAL_Q],
               [fill(t, capital) for t in _CAPITAL_R], [fill(t, w) for w in wrong_cities for t in _CAPITAL_R])


_DEF_Q = ("What is {what}?", "Define {bare}.", 'What does the word "{bare}" mean?', "What is the meaning of {bare}?",
          "In one sentence, what is {what}?", "Explain what {what} is.")
_DEF_R = ("{What} is {p}.", "It is {p}.")


def _definition(i: int, rng: random.Random) -> Fact:
  what, bare, pred, key = DEFINITIONS[i]
  other = [d[2] for j, d in enumerate(DEFINITIONS) if j != i]
  fill = lambda t, p: t.format(what=what, What=_cap(what), bare=bare, p=p)  # noqa: E731
  return _fact("definition", f"definition:{bare}", key, [fill(q, pred) for q in _DEF_Q],
               [fill(t, pred) for t in _DEF_R], [fill(t, p) for p in rng.sample(other, 2) for t in _DEF_R])


def _amount(n: int, singular: str, plural: str) -> str:
  return f"{n} {singular if n == 1 else plural}"


def _unit(i: int, v: int, reverse: bool) -> Fact:
  """`v` of the larger unit in the smaller one, or (reverse) v x factor of the smaller one in the larger."""
  big, bigs, small, smalls, f = UNITS[i]
  n = v * f
  if not reverse:
    q_amount, plural, answer = _amount(v, big, bigs), smalls, n
    questions = (f"How many {smalls} are in {q_amount}?", f"Convert {q_amount} to {smalls}.",
                 f"{_cap(q_amount)} is how many {smalls}?", f"How many {smalls} make {q_amount}?")
    wrong_values = (n * 10, n // 10 if n % 10 == 0 else n + 1, n + f, n - f, v + f)
    a_unit = (small, smalls)
  else:
    q_amount, plural, answer = _amount(n, small, smalls), bigs, v
    questions = (f"How many {bigs} is {q_amount}?", f"Convert {q_amount} to {bigs}.",
                 f"{_cap(q_amount)} equals how many {bigs}?", f"How many {bigs} are {q_amount}?")
    wrong_values = (v + 1, v * 10, v * 2, v - 1, n)
    a_unit = (big, bigs)

  def replies(x):
    a = _amount(x, *a_unit)
    return (f"{_cap(q_amount)} is {a}.", f"That is {a}.", f"The answer is {a}.")

  wrongs = [r for w in wrong_values if w > 0 and w != answer for r in replies(w)]
  return _fact("unit", f"unit:{big}:{v}:{'rev' if reverse else 'fwd'}", str(answer), questions, replies(answer),
               wrongs)


# -- splits and records ----------------------------------------------------------------------------------

def split_facts(seed: int = SEED) -> dict[str, dict[str, list[Fact]]]:
  """{"train"|"eval": {"add"|"sub"|"mul"|"unit"|"capital"|"definition": [Fact]}}; no fact is in both splits."""
  rng = random.Random(f"demo-pairs-facts:{seed}")
  out = {"train": {}, "eval": {}}
  for op, pairs in _arithmetic_keys().items():
    pairs = pairs[:]
    rng.shuffle(pairs)
    n_eval, n_train = COUNTS["eval"][op], COUNTS["train"][op]
    out["eval"][op] = [_arithmetic(op, *p) for p in pairs[:n_eval]]
    out["train"][op] = [_arithmetic(op, *p) for p in pairs[n_eval:n_eval + n_train]]
  units = [(i, v, rev) for i in range(len(UNITS)) for v in range(1, 13) for rev in (False, True)]
  eval_only = [u for u in units if UNITS[u[0]][0] == EVAL_ONLY_UNIT]
  rest = [u for u in units if UNITS[u[0]][0] != EVAL_ONLY_UNIT]
  rng.shuffle(eval_only)
  rng.shuffle(rest)
  n_eval = COUNTS["eval"]["unit"]
  held = eval_only[:n_eval // 4] + rest[:n_eval - n_eval // 4]
  out["eval"]["unit"] = [_unit(*u) for u in held]
  out["train"]["unit"] = [_unit(*u) for u in rest[n_eval - n_eval // 4:][:COUNTS["train"]["unit"]]]
  for type_, table, make in (("capital", CAPITALS, _capital), ("definition", DEFINITIONS, _definition)):
    order = list(range(len(table)))
    rng.shuffle(order)
    k = HELD_OUT[type_]
    out["eval"][type_] = [make(i, rng) for i in sorted(order[:k])]
    out["train"][type_] = [make(i, rng) for i in sorted(order[k:])]
  return out


_CONTINUATIONS = ("\nQuestion: {q}", "\nQuestion: {q}\nAnswer: {r}", "\nUser: {q}", "\nUser: {q}\nModel: {r}",
                  "\n\nQ: {q}\nA: {r}", "\n{q}", "\nQuestion: {q}\nAnswer: {r}\nQuestion: {q2}")


def _rejected(fact: Fact, chosen: str, pool: list[Fact], rng: random.Random) -> tuple[str, str]:
  """(rejected text, its kind): a wrong reply, or a reply that runs on into other questions."""
  u = rng.random()
  kind = "wrong" if u < 0.45 else "runon" if u < 0.85 else "wrong_runon"
  head = chosen if kind == "runon" else rng.choice(fact.wrongs)
  if kind == "wrong":
    return head, kind
  o1, o2 = rng.sample(pool, 2)
  tail = rng.choice(_CONTINUATIONS).format(q=rng.choice(o1.questions), r=rng.choice(o1.replies),
                                           q2=rng.choice(o2.questions))
  return head + tail, kind


def _record(prompt, fact: Fact, pool: list[Fact], rng: random.Random, chosen: str | None = None) -> dict:
  chosen = chosen or rng.choice(fact.replies)
  rejected, kind = _rejected(fact, chosen, pool, rng)
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "type": fact.type, "answer": fact.answer,
          "rejected_kind": kind, "turns": 1 if isinstance(prompt, str) else 2}


def build(seed: int = SEED) -> dict[str, list[dict]]:
  """{"train": records, "eval": records}, shuffled; the same seed gives the same records."""
  facts = split_facts(seed)
  out = {}
  for split, by_type in facts.items():
    rng = random.Random(f"demo-pairs-records:{seed}:{split}")
    pool = [f for fs in by_type.values() for f in fs]
    records = []
    for op in ("add", "sub", "mul", "unit"):
      records += [_record(rng.choice(f.questions), f, pool, rng) for f in by_type[op]]
    for type_ in ("capital", "definition"):
      for f in by_type[type_]:
        records += [_record(q, f, pool, rng) for q in rng.sample(f.questions, REPEATS[split])]
    for _ in range(COUNTS[split]["two_turn"]):
      first, second = rng.sample(pool, 2)
      prompt = [{"role": "user", "content": rng.choice(first.questions)},
                {"role": "assistant", "content": rng.choice(first.replies)},
                {"role": "user", "content": rng.choice(second.questions)}]
      records.append(_record(prompt, second, pool, rng))
    rng.shuffle(records)
    out[split] = [{"id": f"{split}-{i + 1:04d}", **r} for i, r in enumerate(records)]
  return out


def to_jsonl(records: list[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def readme(splits: dict[str, list[dict]], seed: int = SEED) -> str:
  """data/demo/README.md: what the files hold, how they were built, their sizes and checksums."""
  rows = []
  for split in ("train", "eval"):
    recs = splits[split]
    by = lambda f: ", ".join(f"{k} {sum(r[f] == k for r in recs)}" for k in sorted({r[f] for r in recs}))  # noqa: E731
    sha = hashlib.sha256(to_jsonl(recs).encode()).hexdigest()[:16]
    rows.append(f"| {split}.jsonl | {len(recs)} | {by('type')} | {by('rejected_kind')} | "
                f"{sum(r['turns'] == 2 for r in recs)} | `{sha}` |")
  return f"""# Demo preference data (version {VERSION})

Preference pairs for the ORPO chat demo: questions with one checkable answer (small-number arithmetic,
capitals of countries, unit conversions, short definitions). `chosen` is the correct answer in one sentence;
`rejected` is a plausible wrong answer (`rejected_kind` "wrong"), the correct answer followed by the text a
base model runs on with ("runon": `\\nQuestion: ...`, `\\nUser: ...`), or both ("wrong_runon"). Two-turn
records (`turns` 2) give the prompt as messages (question, the model's correct answer, a second question), so
the second turn of a chat is trained too.

Extra fields for evaluation (training ignores them): `type`, `answer` (the canonical answer; for a definition
its key word), `rejected_kind`, `turns`, `id`. Check a reply with
`gemma_jax.data.demo_pairs.is_correct(reply, record["answer"])`.

The facts are split before any record is made: eval asks about other numbers, countries, terms and unit amounts
than train (and holds the only decade conversions), so no eval question appears in training.

| file | records | by type | by rejected kind | two-turn | sha256 (first 16) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Generated, deterministically, by `gemma_jax/data/demo_pairs.py` (tables in `demo_facts.py`), seed {seed}:

    python tools/make_demo_data.py

The files are ours, written by that code; `tests/test_data_demo_pairs.py` fails when they differ from what it
generates. Change the generator, bump `VERSION`, and rerun the command.
"""


def write_demo_data(out_dir: str | os.PathLike, seed: int = SEED) -> list[str]:
  """Writes train.jsonl, eval.jsonl and README.md under `out_dir`; returns their paths."""
  splits = build(seed)
  os.makedirs(out_dir, exist_ok=True)
  texts = (to_jsonl(splits["train"]), to_jsonl(splits["eval"]), readme(splits, seed))
  paths = []
  for name, text in zip(FILES, texts):
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
    paths.append(path)
  return paths
