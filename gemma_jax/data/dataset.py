"""A dataset file prepared for training: every record read, validated, rendered, fitted; problems listed.

    data = prepare_dataset("prefs.jsonl", kind="preference", template=get_template("gemma3"),
                           tokenizer=tok, policy=LengthPolicy(max_length=1024))

By default any malformed record stops preparation with `InvalidRecordsError`, whose message lists one
`FILE:LINE: what is wrong` per record (all records are checked first, so one run shows every problem);
`skip_invalid=True` skips and counts them. Dropped and truncated examples are counted in `data.stats`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from gemma_jax.data.preference import parse_preference, tokenize_pair
from gemma_jax.data.records import Invalid, read_records
from gemma_jax.data.sft import parse_sft, tokenize_sequence
from gemma_jax.data.truncation import LengthPolicy, PrepStats
from gemma_jax.errors import ConfigError, DataError, UserError
from gemma_jax.templates import ChatTemplate
from gemma_jax.tokenizer import Tokenizer

KINDS = ("preference", "sft")


class InvalidRecordsError(DataError):
  """Malformed records; `.invalid` lists them."""

  def __init__(self, message: str, invalid: list[Invalid]):
    super().__init__(message)
    self.invalid = invalid


@dataclasses.dataclass
class PreparedData:
  kind: str
  path: str
  examples: list  # TokenizedPair (preference) or TokenizedSequence (sft), in file order
  invalid: list[Invalid]
  stats: PrepStats
  template: ChatTemplate
  policy: LengthPolicy


def prepare_dataset(path: str | os.PathLike, *, kind: Literal["preference", "sft"], template: ChatTemplate,
                    tokenizer: Tokenizer, policy: LengthPolicy, skip_invalid: bool = False,
                    eos_target: bool | None = None, train_on: Literal["all", "last"] = "all",
                    max_listed: int = 100, require_examples: bool = True) -> PreparedData:
  """Reads, validates, renders and fits every record of `path`.

  eos_target: also train eos at the end of each reply; None = only for the completion template (where eos is
  the only way a reply ends). train_on: SFT `messages`: every assistant reply ("all") or the last one.
  """
  if kind not in KINDS:
    raise ConfigError(f"kind={kind!r}: use one of {', '.join(KINDS)}")
  if eos_target is None:
    eos_target = not template.is_chat
  path = os.fspath(path)
  stats = PrepStats()
  examples, invalid = [], []
  for rec in read_records(path):
    stats.records += 1
    if isinstance(rec, Invalid):
      invalid.append(rec)
      continue
    try:
      if kind == "preference":
        ex = tokenize_pair(rec.where, parse_preference(rec.data), template, tokenizer, policy, stats,
                           eos_target=eos_target)
      else:
        ex = tokenize_sequence(rec.where, parse_sft(rec.data, train_on=train_on), template, tokenizer, policy,
                               stats, eos_target=eos_target)
    except ConfigError:
      raise
    except UserError as e:  # DataError from parsing, or the template rejecting the conversation
      invalid.append(Invalid(rec.where, str(e)))
      continue
    if ex is not None:
      examples.append(ex)
  stats.invalid = len(invalid)
  if invalid and not skip_invalid:
    lines = [str(i) for i in invalid[:max_listed]]
    if len(invalid) > max_listed:
      lines.append(f"... and {len(invalid) - max_listed} more (python -m gemma_jax.data.inspect lists them all)")
    lines.append(f"{len(invalid)} malformed record(s) in {path}; fix them, or skip them with --skip_invalid")
    raise InvalidRecordsError("\n".join(lines), invalid)
  if require_examples and not examples:
    raise DataError(f"{path}: no usable examples ({stats.records} records, {len(invalid)} malformed, "
                    f"{stats.dropped_prompt_too_long + stats.dropped_response_too_long} too long for "
                    f"max_length={policy.max_length})")
  return PreparedData(kind, path, examples, invalid, stats, template, policy)
