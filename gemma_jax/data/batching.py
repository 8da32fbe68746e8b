"""Rows to batches: right padding to length buckets, preference rows, SFT packing.

A batch is a dict of numpy arrays with R rows of T tokens (T a length bucket):
  tokens       [R, T] int32   padding is token 0, but padding is told by `input_mask`, never by the id
  input_mask   [R, T] bool    real tokens
  target_mask  [R, T] bool    token t is a target, predicted from the logits at t - 1 (so [:, 0] is False)
Preference batches (R = 2B: the B chosen rows, then the B rejected rows of the same pairs) add
  nll_mask     [R, T] bool    tokens of the ORPO NLL term: chosen rows only; by default (TRL) every real
                              token but the first (BOS), i.e. `input_mask` shifted;
                              `nll_target="response"`: the chosen rows' targets
Packed SFT batches add
  segment_ids  [R, T] int32   1, 2, ... per packed sequence, 0 for padding
  positions    [R, T] int32   restarting at 0 for each packed sequence (0 on padding)
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from gemma_jax.errors import ConfigError

# One row is one or more (ids [n] int32, target [n] bool, nll [n] bool) segments laid end to end.
Segment = tuple[np.ndarray, np.ndarray, np.ndarray]
Row = list[Segment]
# The ORPO NLL term's tokens: "sequence" (prompt + response, TRL) or "response" (the config's loss.nll_target).
NllTarget = Literal["sequence", "response"]
NLL_TARGETS = ("sequence", "response")


def length_buckets(max_length: int, *, min_length: int = 64) -> tuple[int, ...]:
  """Powers of two from `min_length` up to (and ending with) `max_length`: few shapes, little padding."""
  out, n = [], min_length
  while n < max_length:
    out.append(n)
    n *= 2
  return tuple(out) + (max_length,)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ConfigError(f"a row of {n} tokens is longer than the largest length bucket {max(buckets)}")


def row_length(row: Row) -> int:
  return sum(len(s[0]) for s in row)


def pad_rows(rows: Sequence[Row], length: int, *, nll_mask: bool = False,
             packed: bool = False) -> dict[str, np.ndarray]:
  """Right-pads `rows` to `length` tokens (nll_mask: add the rows' `nll_mask`); see the module docstring."""
  r = len(rows)
  batch = {"tokens": np.zeros((r, length), np.int32), "input_mask": np.zeros((r, length), bool),
           "target_mask": np.zeros((r, length), bool)}
  if nll_mask:
    batch["nll_mask"] = np.zeros((r, length), bool)
  if packed:
    batch["segment_ids"] = np.zeros((r, length), np.int32)
    batch["positions"] = np.zeros((r, length), np.int32)
  for i, row in enumerate(rows):
    t = 0
    for k, (ids, target, nll_m) in enumerate(row, start=1):
      n = len(ids)
      if t + n > length:
        raise ValueError(f"row {i} has {row_length(row)} tokens, more than the batch length {length}")
      batch["tokens"][i, t:t + n] = ids
      batch["input_mask"][i, t:t + n] = True
      batch["target_mask"][i, t:t + n] = target
      if nll_mask:
        batch["nll_mask"][i, t:t + n] = nll_m
      if packed:
        batch["segment_ids"][i, t:t + n] = k
        batch["positions"][i, t:t + n] = np.arange(n)
      # No sequence's first token is a target: nothing is predicted across a segment boundary.
      batch["target_mask"][i, t] = False
      if nll_mask:
        batch["nll_mask"][i, t] = False
      t += n
  return batch


def preference_rows(pairs: Sequence, nll_target: NllTarget = "sequence") -> list[Row]:
  """The 2B rows of B `TokenizedPair`s (None = an empty pair): chosen rows, then rejected rows."""
  if nll_target not in NLL_TARGETS:
    raise ConfigError(f"nll_target={nll_target!r}: use 'sequence' (TRL: prompt + response) or 'response'")
  chosen, rejected = [], []
  for p in pairs:
    if p is None:
      chosen.append([])
      rejected.append([])
      continue
    no_prompt_target = np.zeros(len(p.prompt), bool)
    c_ids = np.concatenate([p.prompt, p.chosen])
    c_target = np.concatenate([no_prompt_target, p.chosen_target])
    c_nll = np.ones(len(c_ids), bool) if nll_target == "sequence" else c_target
    chosen.append([(c_ids, c_target, c_nll)])
    r_ids = np.concatenate([p.prompt, p.rejected])
    r_target = np.concatenate([no_prompt_target, p.rejected_target])
    rejected.append([(r_ids, r_target, np.zeros(len(r_ids), bool))])
  return chosen + rejected


def sequence_rows(seqs: Sequence) -> list[Row]:
  """One row per `TokenizedSequence` (None = an empty row)."""
  return [[] if s is None else [(s.ids, s.target, np.zeros(len(s.ids), bool))] for s in seqs]


def make_preference_batch(pairs: Sequence, length: int, nll_target: NllTarget = "sequence") -> dict:
  """A [2B, length] preference batch of `TokenizedPair`s."""
  return pad_rows(preference_rows(pairs, nll_target), length, nll_mask=True)


def make_sft_batch(seqs: Sequence, length: int) -> dict:
  """A [B, length] padded SFT batch of `TokenizedSequence`s."""
  return pad_rows(sequence_rows(seqs), length)


def pack_next_row(lengths: Sequence[int], start: int, row_length_: int) -> int:
  """Next-fit packing: the end index of the sequences `start, start + 1, ...` that fill one row in order."""
  end, used = start, 0
  while end < len(lengths) and used + lengths[end] <= row_length_:
    used += lengths[end]
    end += 1
  return end
