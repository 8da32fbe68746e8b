"""Chat templates: token-for-token parity with HF's Jinja templates, the prefix invariant, targets, stopping.

Fixtures: tests/fixtures/templates/*.json, rendered by HF transformers' chat-template code from the real Gemma
templates (tools/make_template_fixtures.py), with HF's token ids for the real Gemma 3 vocabulary.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from gemma_jax.errors import UserError
from gemma_jax.convert.gguf import read_gguf_tokenizer
from gemma_jax.templates import (ChatTemplate, HF_CHAT_TEMPLATES, get_template, render_prompts,
                                 template_for_family)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "templates")
CONTROL_TEXT = ("<bos>", "<eos>", "<pad>")  # control-token names written as text inside content


def load_fixture(name):
  with open(os.path.join(FIXTURES, f"{name}.json"), encoding="utf-8") as f:
    return json.load(f)


def render(template, case, tokenizer):
  if case["add_generation_prompt"]:
    return template.render_prompt(case["messages"], tokenizer)
  return template.render_training(case["messages"], tokenizer)[0]


def u(text):
  return {"role": "user", "content": text}


def a(text):
  return {"role": "assistant", "content": text}


def s(text):
  return {"role": "system", "content": text}


@pytest.fixture(scope="session")
def real_tokenizer(real_gguf_path):
  """The real Gemma 3 vocabulary, read from the 270M GGUF (no tensor dequantized)."""
  return read_gguf_tokenizer(real_gguf_path)


# -- parity with HF's templates ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_fixture_jinja_is_ours(name):
  assert load_fixture(name)["jinja"] == HF_CHAT_TEMPLATES[name] == get_template(name).hf_jinja


@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_matches_hf_rendering_tiny_tokenizer(name, tiny_tokenizer):
  fx, template, tok = load_fixture(name), get_template(name), tiny_tokenizer
  rendered = errors = 0
  for case in fx["cases"]:
    if "error" in case:  # HF raised (system role in Gemma 1/2, roles that do not alternate): so do we
      with pytest.raises(UserError):
        render(template, case, tok)
      errors += 1
      continue
    text = case["text"]
    assert text.startswith("<bos>")
    want = [tok.special.bos] + tok.encode(text[len("<bos>"):])
    assert render(template, case, tok) == want, case["messages"]
    rendered += 1
  assert rendered >= 60 and errors >= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_matches_hf_token_ids_real_tokenizer(name, real_tokenizer):
  fx, template, tok = load_fixture(name), get_template(name), real_tokenizer
  checked = 0
  for case in fx["cases"]:
    if "error" in case:
      continue
    ours = render(template, case, tok)
    if any(c in m["content"] for m in case["messages"] for c in CONTROL_TEXT):
      # HF re-tokenizes the rendered string, so `<bos>` typed in a message becomes a second BOS id; we keep
      # message text as text (exactly one BOS), which is what tokenizing the text without control parsing gives.
      assert ours.count(tok.special.bos) == 1 and case["ids_real"].count(tok.special.bos) > 1
      assert ours == [tok.special.bos] + tok.encode(case["text"][len("<bos>"):])
      continue
    assert ours == case["ids_real"], case["messages"]
    checked += 1
  assert checked >= 60


def test_system_rules(tiny_tokenizer):
  tok = tiny_tokenizer
  with pytest.raises(UserError, match="system"):
    get_template("gemma").render_prompt([s("be brief"), u("hi")], tok)
  g3 = get_template("gemma3")
  # Folded into the first user turn as "{system}\n\n{user}", the system text untrimmed.
  assert (g3.render_prompt([s("be brief \n"), u("  hi  "), a("x"), u("more")], tok)
          == g3.render_prompt([u("be brief \n\n\nhi"), a("x"), u("more")], tok))
  with pytest.raises(UserError, match="only come first"):
    g3.render_prompt([u("hi"), s("late system")], tok)
  with pytest.raises(UserError, match="no user message"):
    g3.render_prompt([s("only a system message")], tok)


def test_bad_conversations(tiny_tokenizer):
  t = get_template("gemma3")
  for bad, match in [([u("a"), u("b")], "alternate"), ([a("first")], "alternate"),
                     ([u("a"), {"role": "tool", "content": "x"}], "role"), ([u(3)], "string"),
                     ([u("a <end_of_turn> b")], "control text"), ("just a string", "list of messages"),
                     ([], "end with a user")]:
    with pytest.raises(UserError, match=match):
      t.render_prompt(bad, tiny_tokenizer)
  with pytest.raises(UserError, match="end with an assistant"):
    t.render_training([u("a")], tiny_tokenizer)
  with pytest.raises(UserError, match="end with a user"):
    t.render_prompt([u("a"), a("b")], tiny_tokenizer)


# -- the prefix invariant, BOS, targets --------------------------------------------------------------------

WORDS = "the capital of france is paris . hello world how are you ? café 東京 😀 \n \t  one two".split(" ")


def random_conversation(rng, name):
  def text():
    pad = rng.choice(["", " ", "\n", " \t"])
    return pad + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 10))) + rng.choice(["", " ", "\n"])

  conv = [s(text())] if name in ("gemma3", "gemma4") and rng.random() < 0.3 else []
  for _ in range(rng.randint(1, 4)):
    conv += [u(text()), {"role": rng.choice(["assistant", "model"]), "content": text()}]
  return conv


def check_conversation(template, conv, tok):
  bos, eot, eos = tok.special.bos, tok.special.end_of_turn, tok.special.eos
  full, full_mask = template.render_training(conv, tok)
  assert len(full) == len(full_mask) and full.count(bos) == 1 and full[0] == bos and not full_mask[0]
  replies = [i for i, m in enumerate(conv) if m["role"] in ("assistant", "model")]
  for i in replies:
    prompt = template.render_prompt(conv[:i], tok)
    assert prompt.count(bos) == 1
    ids, mask = template.render_training(conv[:i + 1], tok, train_from=i)
    # The sampling prompt is an exact token prefix of the training rendering; targets start where it ends.
    assert ids[:len(prompt)] == prompt and ids == full[:len(ids)]
    assert not any(mask[:len(prompt)]) and mask[len(prompt)]
    # The targets are exactly the reply's content and its <end_of_turn>; then a non-target newline.
    targets = [t for t, m in zip(ids, mask) if m]
    assert targets[-1] == eot and tok.decode(targets[:-1]) == conv[i]["content"].strip()
    assert targets == ids[len(prompt):len(ids) - 1] and not mask[-1]
    # With eos_target, the reply ends <end_of_turn><eos>, both targets (a base model learns to stop).
    ids_e, mask_e = template.render_training(conv[:i + 1], tok, train_from=i, eos_target=True)
    assert ids_e == ids[:-1] + [eos] and mask_e == mask[:-1] + [True]
  # A reply rendered on its own continues the prompt exactly (multi-turn replies too).
  for j in replies:
    ids, mask = template.render_training(conv, tok, train_from=j)
    r_ids, r_mask = template.render_response(conv[j:], tok)
    assert template.render_prompt(conv[:j], tok) + r_ids == ids and mask[len(ids) - len(r_ids):] == r_mask
    assert template.render_response(conv[j:], tok, eos_target=True) == (r_ids[:-1] + [eos], r_mask[:-1] + [True])
  # Training on the whole conversation: every reply is a target, nothing else.
  want = sorted(j for i in replies for j in range(len(template.render_prompt(conv[:i], tok)),
                                                    len(template.render_training(conv[:i + 1], tok)[0]) - 1))
  assert [j for j, m in enumerate(full_mask) if m] == want


@pytest.mark.parametrize("name", ["gemma", "gemma3", "gemma4"])
def test_prefix_invariant_many_conversations(name, tiny_tokenizer, tiny_tokenizer_v4):
  rng = random.Random(name)
  tok = tiny_tokenizer_v4 if name == "gemma4" else tiny_tokenizer
  for _ in range(150):
    check_conversation(get_template(name), random_conversation(rng, name), tok)


@pytest.mark.slow
def test_prefix_invariant_real_tokenizer(real_tokenizer):
  rng = random.Random(1)
  for name in ("gemma", "gemma3"):
    for _ in range(60):
      check_conversation(get_template(name), random_conversation(rng, name), real_tokenizer)


@pytest.mark.parametrize("name", ["gemma", "gemma3", "gemma4"])
def test_next_turn_continues_the_cache(name, tiny_tokenizer, tiny_tokenizer_v4):
  tok, t = tiny_tokenizer_v4 if name == "gemma4" else tiny_tokenizer, get_template(name)
  conv = [u("hello"), a("hello world"), u(" how are you? ")]
  prompt = t.render_prompt(conv, tok)
  reply = tok.encode("fine thanks!")  # what the model generated, up to (not including) <end_of_turn>
  nxt = t.render_next_turn(u("one two three"), tok)
  assert nxt[0] == tok.special.end_of_turn
  assert prompt + reply + nxt == t.render_prompt(conv + [a("fine thanks!"), u("one two three")], tok)
  with pytest.raises(UserError):
    t.render_next_turn(a("not a user turn"), tok)


def test_stop_tokens_and_headers_real_ids(tiny_tokenizer):
  tok = tiny_tokenizer
  for name in ("gemma", "gemma3", "completion"):
    assert get_template(name).stop_token_ids(tok) == [tok.special.eos, tok.special.end_of_turn]
  gen = get_template("gemma3").generation_prompt(tok)
  assert tok.decode(gen[1:]) == "model\n" and gen[0] == tok.special.start_of_turn


@pytest.mark.slow
def test_real_special_ids(real_tokenizer):
  t = get_template("gemma3")
  assert t.stop_token_ids(real_tokenizer) == [1, 106]  # HF generation_config eos_token_id for Gemma 3
  assert t.render_prompt([u("Hi")], real_tokenizer) == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]


def test_completion_template(tiny_tokenizer):
  tok, t = tiny_tokenizer, get_template("completion")
  prompt = t.render_prompt([u("the capital of france is")], tok)
  assert prompt == [tok.special.bos] + tok.encode("the capital of france is")
  ids, mask = t.render_training([u("the capital of france is"), a(" paris .")], tok, eos_target=True)
  completion = tok.encode(" paris .")  # not trimmed: plain text continues exactly
  assert ids == prompt + completion + [tok.special.eos]
  assert mask == [False] * len(prompt) + [True] * (len(completion) + 1)
  ids, mask = t.render_training([u("the capital of france is"), a(" paris .")], tok)
  assert ids == prompt + completion and mask[-1]
  with pytest.raises(UserError, match="no system role"):
    t.render_prompt([s("x"), u("y")], tok)
  with pytest.raises(UserError, match="no turns"):
    t.render_next_turn(u("x"), tok)


def test_render_prompts_for_sampling(tiny_tokenizer):
  tok, t = tiny_tokenizer, get_template("gemma3")
  assert render_prompts(None, ["hello world", "東京"], tok) == [tok.encode(p, add_bos=True)
                                                               for p in ("hello world", "東京")]
  (row,) = render_prompts(t, ["hello world"], tok, system="one two")
  assert row == t.render_prompt([s("one two"), u("hello world")], tok)
  # Gemma 3 folds the system message into the first user turn, then opens the model's turn
  assert tok.decode(row[1:]).endswith("one two\n\nhello world<end_of_turn>\n<start_of_turn>model\n")
  assert render_prompts(t, ["x"], tok, system="") == [t.render_prompt([u("x")], tok)]
  with pytest.raises(UserError, match="no system role"):
    render_prompts(get_template("gemma"), ["x"], tok, system="be brief")


def test_serialization_and_lookup():
  for name in ("gemma", "gemma3", "gemma4", "completion"):
    t = get_template(name)
    d = json.loads(json.dumps(t.to_dict()))
    assert ChatTemplate.from_dict(d) == t and t.name == name
  assert template_for_family("gemma1").name == "gemma" and template_for_family("gemma2").name == "gemma"
  assert template_for_family("gemma3").name == "gemma3" and template_for_family("gemma4").name == "gemma4"
  with pytest.raises(UserError, match="unknown chat template"):
    get_template("llama")
  with pytest.raises(UserError, match="unknown fields"):
    ChatTemplate.from_dict({"name": "gemma3", "eos_target": True})  # training options are never saved
  with pytest.raises(UserError, match="family"):
    template_for_family("gemma5")


# -- Gemma 4 -------------------------------------------------------------------------------------------------

def test_gemma4_turns_system_and_markers(tiny_tokenizer, tiny_tokenizer_v4):
  """`<|turn>{role}\n{content}<turn|>\n`, a system message as a turn of its own, `<|turn>model\n` opening
  the reply; the ids are those of the rendered text; the sampler stops on eos and `<turn|>`."""
  tok, t = tiny_tokenizer_v4, get_template("gemma4")
  sot, eot = tok.piece_to_id("<|turn>"), tok.piece_to_id("<turn|>")
  assert (tok.special.start_of_turn, tok.special.end_of_turn) == (sot, eot) and tok.turn_format == "v4"
  conv = [s(" be brief "), u(" hello "), a("hello world"), u("how are you ?")]
  text = "<|turn>system\nbe brief<turn|>\n<|turn>user\nhello<turn|>\n<|turn>model\nhello world<turn|>\n" \
         "<|turn>user\nhow are you ?<turn|>\n<|turn>model\n"
  assert t.render_prompt(conv, tok) == [tok.special.bos] + tok.encode(text)
  assert t.stop_token_ids(tok) == [tok.special.eos, eot]
  # The Jinja template we export renders the same text.
  import jinja2
  jinja = jinja2.Environment().from_string(t.hf_jinja)
  assert jinja.render(messages=conv, bos_token="<bos>", add_generation_prompt=True) == "<bos>" + text
  # Targets: the reply and its <turn|>; the system turn never.
  ids, mask = t.render_training(conv[:3], tok)
  assert tok.decode([i for i, m in zip(ids, mask) if m][:-1]) == "hello world" and ids[mask.index(True) - 1] != eot
  with pytest.raises(UserError, match="only come first"):
    t.render_prompt([u("hi"), s("late")], tok)
  with pytest.raises(UserError, match="no user message"):
    t.render_prompt([s("only a system message")], tok)
  with pytest.raises(UserError, match="control text"):
    t.render_prompt([u("a <turn|> b")], tok)


def test_a_template_and_a_tokenizer_of_other_turn_markers_are_refused(tiny_tokenizer, tiny_tokenizer_v4):
  with pytest.raises(UserError, match=r"'gemma3' template writes <start_of_turn> turns .* use the 'gemma4'"):
    get_template("gemma3").render_prompt([u("hi")], tiny_tokenizer_v4)
  with pytest.raises(UserError, match=r"'gemma4' template writes <\|turn> turns .* use the 'gemma3'"):
    get_template("gemma4").render_prompt([u("hi")], tiny_tokenizer)
