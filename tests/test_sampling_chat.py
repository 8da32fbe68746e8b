"""Chat: the cache carries over turns (earlier turns are not prefilled again), templates, the PT warning."""

from __future__ import annotations

import jax
import pytest

from helpers import tiny_config
from gemma_jax.errors import UserError
from gemma_jax.model import init_params
from gemma_jax.sampling import Sampler
from gemma_jax.sampling.chat import ChatSession, resolve_template
from gemma_jax.templates import get_template


@pytest.fixture(scope="module")
def sampler(tiny_tokenizer):
  cfg = tiny_config("gemma3", vocab_size=300)
  params = init_params(cfg, jax.random.key(4))
  params["embedder"]["input_embedding"] = params["embedder"]["input_embedding"] * 0.1
  return Sampler(cfg, params, tiny_tokenizer, prefill_chunk=16, min_cache=32)  # grows over the turns


def test_multi_turn_reuses_the_cache(sampler, tiny_tokenizer):
  t = get_template("gemma3")
  chat = ChatSession(sampler, t, max_new_tokens=6)
  u1, u2, u3 = "hello world", "how are you today ?", "one two three"
  streamed = []
  r1 = chat.send(u1, on_text=streamed.append)
  assert r1 == "".join(streamed) == chat.last.text
  first = chat.last
  before = sampler.prefilled_tokens
  size = lambda: chat._state.cache["layer_5"]["pos"].shape[1]  # the global layer
  s1 = size()
  r2 = chat.send(u2)
  assert size() > s1  # the cache grew between turns (old slots kept)
  second = chat.last
  fed = sampler.prefilled_tokens - before
  next_ids = t.render_next_turn({"role": "user", "content": u2}, tiny_tokenizer)
  # only the new turn (plus the reply's last token when the reply ran out of tokens) was prefilled
  assert fed == len(next_ids) + (first.stop_reason != "stop_id")
  prompt1 = t.render_prompt([{"role": "user", "content": u1}], tiny_tokenizer)
  assert fed < len(prompt1) + len(first.tokens) + len(next_ids)
  # and the reply equals a fresh prefill of the whole token history
  history = prompt1 + first.tokens + next_ids
  fresh = sampler.generate([history], max_new_tokens=6, stop_ids=t.stop_token_ids(tiny_tokenizer))[0]
  assert fresh.tokens == second.tokens and fresh.text == r2
  chat.send(u3)
  assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3
  chat.reset()
  assert chat.messages == []


def test_pt_checkpoint_warns(sampler):
  warnings = []
  ChatSession(sampler, get_template("gemma3"), kind="pt", warn=warnings.append)
  assert len(warnings) == 1
  w = warnings[0]
  assert "pretrained (PT)" in w and "continues the text" in w and "instruction-tuned (IT)" in w
  assert "fine-tune" in w and "--template=none" in w
  ChatSession(sampler, get_template("gemma3"), kind="it", warn=warnings.append)
  assert len(warnings) == 1


def test_resolve_template():
  saved = {"name": "gemma3"}
  warns = []
  assert resolve_template("auto", saved, "gemma3", kind="it").name == "gemma3"
  assert resolve_template("auto", saved, "gemma3", kind="pt") is None  # plain sampling of a PT model
  assert resolve_template("auto", saved, "gemma3", kind="pt", for_chat=True).name == "gemma3"
  assert resolve_template("none", saved, "gemma3") is None
  assert resolve_template("gemma", saved, "gemma3", warn=warns.append).name == "gemma"
  assert len(warns) == 1 and "differs" in warns[0]
  with pytest.raises(UserError, match="differs"):
    resolve_template("gemma", saved, "gemma3", strict=True)
  assert resolve_template("auto", None, "gemma2", warn=warns.append).name == "gemma"
  with pytest.raises(UserError):
    resolve_template("none", saved, "gemma3", for_chat=True)
  with pytest.raises(UserError):
    resolve_template("nope", saved, "gemma3")


def test_system_message_the_template_cannot_take_is_refused_at_once(sampler, tiny_tokenizer):
  """At construction, not on every turn: Gemma 1/2's template has no system role."""
  with pytest.raises(UserError) as e:
    ChatSession(sampler, get_template("gemma"), system="be brief")
  assert str(e.value) == ("system message: the 'gemma' template has no system role (Gemma 1/2 and plain "
                          "completion reject it); merge it into the first user message or use 'gemma3'")
  assert ChatSession(sampler, get_template("gemma3"), system="be brief").messages[0]["role"] == "system"
