"""When a row stops: stop tokens (eos, end_of_turn, user ids), checked inside the jitted loop, and stop
strings, checked on the host between decode chunks (they need detokenized text).

The output is cut at the stop: a stop token is not part of the text, and the text ends just before the
first occurrence of a stop string.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from gemma_jax.errors import UserError
from gemma_jax.tokenizer import Tokenizer

MAX_STOP_IDS = 16  # the jitted loop takes a fixed-size id list, so a new list does not recompile


@dataclasses.dataclass(frozen=True)
class StopRules:
  """stop_ids: token ids that end a row (eos, end_of_turn, user ids); stop_strings: texts that end a row."""

  stop_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()

  def __post_init__(self):
    if len(self.stop_ids) > MAX_STOP_IDS:
      raise UserError(f"at most {MAX_STOP_IDS} stop token ids are supported, got {len(self.stop_ids)}")
    if any(not s for s in self.stop_strings):
      raise UserError("stop strings must not be empty")

  def id_array(self) -> np.ndarray:
    """[MAX_STOP_IDS] int32, padded with -1 (never a token)."""
    out = np.full((MAX_STOP_IDS,), -1, np.int32)
    out[:len(self.stop_ids)] = self.stop_ids
    return out


def default_stop_ids(tokenizer: Tokenizer, extra: Iterable[int] = ()) -> tuple[int, ...]:
  """eos and end_of_turn (what HF's generation config and gemma.cpp stop on), plus `extra`."""
  ids = [tokenizer.special.eos]
  if tokenizer.special.end_of_turn is not None:
    ids.append(tokenizer.special.end_of_turn)
  for i in extra:
    if i not in ids:
      ids.append(int(i))
  return tuple(ids)


def stop_ids_for(template, tokenizer: Tokenizer, extra: Iterable[int] = ()) -> tuple[int, ...]:
  """The ids that end a reply: the chat template's (end_of_turn, eos), or eos and end_of_turn for plain
  completion (`template` None), then `extra` (user ids), each once, in that order."""
  ids = default_stop_ids(tokenizer) if template is None else tuple(template.stop_token_ids(tokenizer))
  return tuple(dict.fromkeys((*ids, *(int(i) for i in extra))))


def parse_stop_tokens(spec: Sequence[str], tokenizer: Tokenizer) -> tuple[int, ...]:
  """User stop tokens given as ids ('107') or pieces ('<end_of_turn>') -> ids."""
  ids = []
  for s in spec:
    s = s.strip()
    if s.lstrip("-").isdigit():
      i = int(s)
      if not 0 <= i < tokenizer.vocab_size:
        raise UserError(f"stop token id {i} is outside the vocabulary (0..{tokenizer.vocab_size - 1})")
    else:
      i = tokenizer.piece_to_id(s)
      if i == tokenizer.special.unk and s != tokenizer.id_to_piece(tokenizer.special.unk):
        raise UserError(f"stop token {s!r} is not a single piece of the vocabulary; use a stop string instead")
    ids.append(i)
  return tuple(ids)


def find_stop_string(text: str, stop_strings: Sequence[str]) -> int:
  """Index where the earliest stop string starts in `text`, or -1."""
  hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
  return min(hits) if hits else -1


def cut_at_stop_id(tokens: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], int | None]:
  """Tokens before the first stop id, and that id (None if no stop id occurs)."""
  stop = set(stop_ids)
  for i, t in enumerate(tokens):
    if int(t) in stop:
      return [int(x) for x in tokens[:i]], int(t)
  return [int(x) for x in tokens], None
