"""Preference pairs: parse the HF formats, render with the chat template, fit to the length policy.

Formats (extra fields such as prompt_id or score_chosen are ignored):
  explicit prompt   {"prompt", "chosen", "rejected"}: each a string or a list of {role, content} messages;
                    prompt = the conversation so far (ends with a user turn), chosen / rejected = the reply
                    (assistant message(s)).
  implicit prompt   {"chosen", "rejected"}: full conversations; the prompt is their longest common prefix of
                    turns ending with a user turn, the rest are the two replies.
  UltraFeedback     {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant], ...}: the
                    conversations carry the prompt; the string prompt must match their last shared user turn.

The response of each side is everything the template renders after the prompt (reply content +
`<end_of_turn>` as targets, the newline after it not a target); the prompt ids are exactly
`template.render_prompt(prompt)`, so the sampler sees what training saw.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gemma_jax.data.records import as_messages, check_alternation, require
from gemma_jax.data.truncation import LengthPolicy, PrepStats, fit_response, truncate_prompt
from gemma_jax.errors import DataError
from gemma_jax.templates import ChatTemplate
from gemma_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  prompt: list[dict[str, str]]  # ends with a user message
  chosen: list[dict[str, str]]  # starts with an assistant message
  rejected: list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
  """prompt: [P] int32 (BOS ... generation prompt); chosen/rejected: [C]/[R] int32 response ids, with bool
  target masks of the same length."""

  where: str
  prompt: np.ndarray
  chosen: np.ndarray
  chosen_target: np.ndarray
  rejected: np.ndarray
  rejected_target: np.ndarray


def _key(messages):
  return [(m["role"], m["content"].strip()) for m in messages]


def parse_preference(d: dict[str, Any]) -> PreferenceExample:
  """A record in one of the formats above; DataError (no location) if it is malformed."""
  chosen_raw, rejected_raw = require(d, "chosen"), require(d, "rejected")
  if isinstance(chosen_raw, str) != isinstance(rejected_raw, str):
    raise DataError("'chosen' and 'rejected' must both be strings or both be message lists")
  chosen = as_messages(chosen_raw, "chosen", default_role="assistant")
  rejected = as_messages(rejected_raw, "rejected", default_role="assistant")
  full = chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant"
  prompt_raw = d.get("prompt")

  if full:  # conversations that contain the prompt: implicit, or UltraFeedback-style with a prompt field
    check_alternation(chosen, "chosen")
    check_alternation(rejected, "rejected")
    if isinstance(prompt_raw, list):
      prompt = as_messages(prompt_raw, "prompt", default_role="user")
      n = len(prompt)
      if _key(chosen[:n]) != _key(prompt) or _key(rejected[:n]) != _key(prompt):
        raise DataError("'chosen' and 'rejected' are conversations that do not start with 'prompt'")
    else:
      n = 0
      while n < min(len(chosen), len(rejected)) and _key(chosen[n:n + 1]) == _key(rejected[n:n + 1]):
        n += 1
      while n > 0 and chosen[n - 1]["role"] != "user":
        n -= 1
      if n == 0:
        raise DataError("no prompt: 'chosen' and 'rejected' share no user turn and there is no 'prompt' field")
      prompt = chosen[:n]
      if isinstance(prompt_raw, str) and prompt_raw.strip() != prompt[-1]["content"].strip():
        raise DataError("'prompt' does not match the last user turn shared by 'chosen' and 'rejected'")
      elif prompt_raw is not None and not isinstance(prompt_raw, str):
        raise DataError(f"field 'prompt' must be a string or a list of messages, got {type(prompt_raw).__name__}")
    chosen, rejected = chosen[n:], rejected[n:]
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
      if not reply:
        raise DataError(f"'{name}' has no reply after the prompt")
  else:
    if prompt_raw is None:
      raise DataError("missing field 'prompt' (chosen and rejected are replies only, so the prompt is needed)")
    prompt = as_messages(prompt_raw, "prompt", default_role="user")
    check_alternation(prompt, "prompt")

  if prompt[-1]["role"] != "user":
    raise DataError("the prompt must end with a user message")
  for name, reply in (("chosen", chosen), ("rejected", rejected)):
    if reply[0]["role"] != "assistant":
      raise DataError(f"'{name}' must start with an assistant reply")
    check_alternation([{"role": "user", "content": "x"}] + reply, name)
    if reply[-1]["role"] != "assistant":
      raise DataError(f"'{name}' must end with an assistant reply")
  if _key(chosen) == _key(rejected):
    raise DataError("'chosen' and 'rejected' are identical")
  return PreferenceExample(prompt, chosen, rejected)


def render_pair(ex: PreferenceExample, template: ChatTemplate, tokenizer: Tokenizer, *,
                eos_target: bool) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Token ids of the prompt and of each response (with target masks), before truncation."""
  prompt = template.render_prompt(ex.prompt, tokenizer)
  out = []
  for reply in (ex.chosen, ex.rejected):
    ids, mask = template.render_response(reply, tokenizer, eos_target=eos_target)
    out.append((np.asarray(ids, np.int32), np.asarray(mask, bool)))
  return np.asarray(prompt, np.int32), out[0], out[1]


def tokenize_pair(where: str, ex: PreferenceExample, template: ChatTemplate, tokenizer: Tokenizer,
                  policy: LengthPolicy, stats: PrepStats, *, eos_target: bool) -> TokenizedPair | None:
  """Renders and fits one pair; None (counted in `stats`) when it is dropped."""
  prompt, (c, ct), (r, rt) = render_pair(ex, template, tokenizer, eos_target=eos_target)
  if _key(ex.chosen) != _key(ex.rejected) and np.array_equal(c, r):
    raise DataError("'chosen' and 'rejected' tokenize to the same ids")
  prompt, cut = truncate_prompt(prompt, policy, head=1, tail=len(template.generation_prompt(tokenizer)))
  if len(prompt) >= policy.max_length:
    stats.dropped_prompt_too_long += 1
    return None
  budget = policy.max_length - len(prompt)
  c, ct, c_status = fit_response(c, ct, budget, policy)
  r, rt, r_status = fit_response(r, rt, budget, policy)
  if "drop" in (c_status, r_status):
    stats.dropped_response_too_long += 1
    return None
  stats.truncated_prompts += cut
  stats.truncated_responses += (c_status == "cut") + (r_status == "cut")
  stats.kept += 1
  stats.add_length("prompt", len(prompt))
  stats.add_length("chosen", len(c))
  stats.add_length("rejected", len(r))
  stats.add_length("row", len(prompt) + max(len(c), len(r)))
  return TokenizedPair(where, prompt, c, ct, r, rt)
