"""SFT examples: parse `{messages}` or `{prompt, completion}`, render for training, fit to the length policy.

  {"messages": [...]}          a conversation ending with an assistant reply; by default every assistant
                               reply is a target (`train_on="all"`), or only the last one (`"last"`).
  {"prompt", "completion"}     strings (plain text, e.g. with the completion template) or message lists
                               (TRL's conversational prompt-completion); the completion is the target.

The prompt of an SFT sequence is everything before its first target token; it is cut and dropped by the same
`LengthPolicy` as preference prompts, and the rest is fitted into `max_length - len(prompt)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from gemma_jax.data.records import as_messages, check_alternation, require
from gemma_jax.data.truncation import LengthPolicy, PrepStats, fit_response, truncate_prompt
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.templates import ChatTemplate
from gemma_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SFTExample:
  messages: list[dict[str, str]]
  train_from: int  # index of the first message whose assistant replies are targets


@dataclasses.dataclass(frozen=True)
class TokenizedSequence:
  """ids: [T] int32, target: [T] bool (target[0] is False: BOS)."""

  where: str
  ids: np.ndarray
  target: np.ndarray


def parse_sft(d: dict[str, Any], *, train_on: Literal["all", "last"] = "all") -> SFTExample:
  """A record in one of the formats above; DataError (no location) if it is malformed."""
  if train_on not in ("all", "last"):
    raise ConfigError(f"train_on={train_on!r}: use 'all' or 'last'")
  if "messages" in d and d["messages"] is not None:
    if isinstance(d["messages"], str):
      raise DataError("field 'messages' must be a list of messages, got a string")
    messages = as_messages(d["messages"], "messages", default_role="user")
    check_alternation(messages, "messages")
    if messages[-1]["role"] != "assistant":
      raise DataError("'messages' must end with an assistant reply")
    train_from = len(messages) - 1 if train_on == "last" else 0
    return SFTExample(messages, train_from)
  if "prompt" not in d and "completion" not in d:
    raise DataError("missing field 'messages' (or 'prompt' and 'completion')")
  prompt_raw, completion_raw = require(d, "prompt"), require(d, "completion")
  prompt = as_messages(prompt_raw, "prompt", default_role="user")
  completion = as_messages(completion_raw, "completion", default_role="assistant")
  messages = prompt + completion
  check_alternation(messages, "prompt + completion")
  if prompt[-1]["role"] != "user" or completion[-1]["role"] != "assistant":
    raise DataError("'prompt' must end with a user message and 'completion' with an assistant reply")
  return SFTExample(messages, len(prompt))


def tokenize_sequence(where: str, ex: SFTExample, template: ChatTemplate, tokenizer: Tokenizer,
                      policy: LengthPolicy, stats: PrepStats, *, eos_target: bool) -> TokenizedSequence | None:
  """Renders and fits one example; None (counted in `stats`) when it is dropped."""
  ids, mask = template.render_training(ex.messages, tokenizer, eos_target=eos_target, train_from=ex.train_from)
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
  first = int(np.flatnonzero(mask)[0])  # the content of an assistant reply, or its <end_of_turn>
  tail = len(template.generation_prompt(tokenizer))
  prompt, cut = truncate_prompt(ids[:first], policy, head=1, tail=tail)
  if len(prompt) >= policy.max_length:
    stats.dropped_prompt_too_long += 1
    return None
  rest, rest_mask, status = fit_response(ids[first:], mask[first:], policy.max_length - len(prompt), policy)
  if status == "drop":
    stats.dropped_response_too_long += 1
    return None
  stats.truncated_prompts += cut
  stats.truncated_responses += status == "cut"
  stats.kept += 1
  out_ids = np.concatenate([prompt, rest])
  out_mask = np.concatenate([np.zeros(len(prompt), bool), rest_mask])
  stats.add_length("prompt", len(prompt))
  stats.add_length("completion", len(rest))
  stats.add_length("row", len(out_ids))
  return TokenizedSequence(where, out_ids, out_mask)
