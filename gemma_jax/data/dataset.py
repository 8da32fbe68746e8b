"""A dataset file prepared for training: every record read, validated, rendered, fitted; problems listed.

    data = prepare_dataset("prefs.jsonl", kind="preference", template=get_template("gemma3"),
                           tokenizer=tok, policy=LengthPolicy(max_length=1024))

By default any malformed record stops preparation with `InvalidRecordsError`, whose message lists one
`FILE:LINE: what is wrong` per record (all records are checked first, so one run shows every problem);
`skip_invalid=True` skips and counts them (training: `--config.data.skip_invalid=true`; the inspect command:
`--skip_invalid`). Dropped and truncated examples are counted in `data.stats`. A tokenizer that lacks the
template's special tokens is refused once, up front (`check_tokenizer`), not as one error per record.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from typing import Literal

from gemma_jax.data.preference import parse_preference, tokenize_pair
from gemma_jax.data.records import Invalid, read_records
from gemma_jax.data.sft import parse_sft, tokenize_sequence
from gemma_jax.data.truncation import LengthPolicy, PrepStats
from gemma_jax.errors import ConfigError, DataError, UserError
from gemma_jax.templates import TURN_FORMAT, ChatTemplate
from gemma_jax.tokenizer import TURN_MARKERS, Tokenizer

KINDS = ("preference", "sft")
SKIP_ADVICE = "skip them with --config.data.skip_invalid=true (training) or --skip_invalid (inspect)"


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


def check_tokenizer(template: ChatTemplate, tokenizer: Tokenizer, name: str | None = None) -> None:
  """ConfigError unless `tokenizer` has every special token `template` renders (name: for the message)."""
  sp = tokenizer.special
  need = {"<bos>": sp.bos, "<eos>": sp.eos}
  if template.is_chat:
    start, end = TURN_MARKERS[TURN_FORMAT[template.name]]
    need.update({start: sp.start_of_turn, end: sp.end_of_turn})
  missing = [piece for piece, i in need.items() if i is None or i < 0]
  if missing:
    what = name or f"the tokenizer ({tokenizer.vocab_size} pieces)"
    only_turns = not set(missing) - {m for pair in TURN_MARKERS.values() for m in pair}  # completion would work
    raise ConfigError(f"{what} has no {', '.join(missing)} token{'s' if len(missing) > 1 else ''}, which the "
                      f"{template.name!r} template needs; use a Gemma tokenizer"
                      + (" (or the completion template)" if only_turns else ""))


def no_examples_error(data: "PreparedData") -> DataError:
  """What training says of a dataset with no usable example (the inspect command says the same)."""
  s = data.stats
  if s.records == 0:
    return DataError(f"{data.path}: no usable examples (it holds no records)")
  return DataError(f"{data.path}: no usable examples ({s.records} records, {len(data.invalid)} malformed, "
                   f"{s.dropped_prompt_too_long + s.dropped_response_too_long} too long for "
                   f"max_length={data.policy.max_length})")


def _process(records: list, kind: str, template: ChatTemplate, tokenizer: Tokenizer, policy: LengthPolicy,
             eos_target: bool, train_on: str) -> tuple[list, PrepStats]:
  """Each record -> an example, an Invalid, or None (dropped, counted in the returned stats)."""
  stats = PrepStats()
  out = []
  for rec in records:
    if isinstance(rec, Invalid):
      out.append(rec)
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
      ex = Invalid(rec.where, str(e))
    out.append(ex)
  return out, stats


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(model_proto: bytes) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = Tokenizer(model_proto)


def _process_in_worker(args):
  records, kind, template_dict, policy, eos_target, train_on = args
  return _process(records, kind, ChatTemplate.from_dict(template_dict), _WORKER_TOKENIZER, policy, eos_target,
                  train_on)


def _chunks(it, size):
  chunk = []
  for x in it:
    chunk.append(x)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def prepare_dataset(path: str | os.PathLike, *, kind: Literal["preference", "sft"], template: ChatTemplate,
                    tokenizer: Tokenizer, policy: LengthPolicy, skip_invalid: bool = False,
                    eos_target: bool | None = None, train_on: Literal["all", "last"] = "all",
                    max_listed: int = 100, require_examples: bool = True, num_workers: int = 0,
                    tokenizer_name: str | None = None) -> PreparedData:
  """Reads, validates, renders and fits every record of `path`.

  skip_invalid: skip and count malformed records (`data.invalid`, `data.stats.invalid`) instead of raising
  InvalidRecordsError. eos_target: also train eos at the end of each reply; None = only for the completion
  template (where eos is the only way a reply ends). train_on: SFT `messages`: every assistant reply ("all")
  or the last one. require_examples: DataError (`no_examples_error`) when no example is left.
  num_workers: tokenize in that many processes (0: in this one); the result is identical.
  tokenizer_name: how messages name the tokenizer (e.g. its path); default: its size.
  """
  if kind not in KINDS:
    raise ConfigError(f"kind={kind!r}: use one of {', '.join(KINDS)}")
  check_tokenizer(template, tokenizer, tokenizer_name)
  if eos_target is None:
    eos_target = not template.is_chat
  path = os.fspath(path)
  stats = PrepStats()
  examples, invalid = [], []
  if num_workers > 0:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX's threads
    jobs = ((chunk, kind, template.to_dict(), policy, eos_target, train_on)
            for chunk in _chunks(read_records(path), 512))
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer.model_proto,)) as pool:
      parts = list(pool.imap(_process_in_worker, jobs))
  else:
    parts = [_process(chunk, kind, template, tokenizer, policy, eos_target, train_on)
             for chunk in _chunks(read_records(path), 512)]
  for items, part_stats in parts:
    stats.merge(part_stats)
    for item in items:
      stats.records += 1
      if isinstance(item, Invalid):
        invalid.append(item)
      elif item is not None:
        examples.append(item)
  stats.invalid = len(invalid)
  if invalid and not skip_invalid:
    lines = [str(i) for i in invalid[:max_listed]]
    if len(invalid) > max_listed:
      lines.append(f"... and {len(invalid) - max_listed} more (python -m gemma_jax.data.inspect lists them all)")
    lines.append(f"{len(invalid)} malformed record(s) in {path}; fix them, or {SKIP_ADVICE}")
    raise InvalidRecordsError("\n".join(lines), invalid)
  data = PreparedData(kind, path, examples, invalid, stats, template, policy)
  if require_examples and not examples:
    raise no_examples_error(data)
  return data
