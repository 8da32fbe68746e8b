"""A resumable iterator of batches: seeded shuffling, epochs, host sharding, exact save/restore.

    it = DataIterator(data, batch_size=8, seed=0, max_length=1024)   # data: a PreparedData
    batch = next(it)             # dict of numpy arrays (batching.py)
    state = it.get_state()       # JSON-serializable; saved with the checkpoint
    it2 = DataIterator(data, batch_size=8, seed=0, max_length=1024, state=state)  # continues with the next example

Order: epoch e visits the examples in `np.random.default_rng([seed, e]).permutation(N)` (file order with
`shuffle=False`). Global batch: `batch_size` pairs (2 * batch_size rows) for preference data, `batch_size` rows
for SFT (one sequence per row, or several with `packing=True`: next-fit in visiting order, rows of
`max_length`). A final partial batch of an epoch is dropped (`drop_remainder=True`) or filled with empty
rows (all masks False). The state is the epoch and the position in its order, plus a fingerprint of the
data, so a restored iterator continues with the very next example and refuses data that changed.

Hosts: every host builds the same global batch plan (lengths only) and materializes rows
[process_index * R / process_count, (process_index + 1) * R / process_count) of it; the batch length T is
the bucket of the longest row of the global batch, so all hosts agree on shapes. Assembling the hosts'
slices in process order gives the global batch (for preference data: all chosen rows, then all rejected).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from gemma_jax.data.batching import (NllTarget, bucket_for, length_buckets, pack_next_row, pad_rows, preference_rows,
                                     row_length, sequence_rows)
from gemma_jax.errors import ConfigError, DataError

STATE_VERSION = 1


def fingerprint(examples: Sequence) -> str:
  """A hash of the tokenized examples (ids and masks, in order): changes when data, template or policy do."""
  h = hashlib.sha256()
  for ex in examples:
    for a in _arrays(ex):
      h.update(np.int64(len(a)).tobytes())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:32]


def _arrays(ex) -> tuple[np.ndarray, ...]:
  if hasattr(ex, "chosen"):
    return ex.prompt, ex.chosen, ex.chosen_target, ex.rejected, ex.rejected_target
  return ex.ids, ex.target


class DataIterator:
  """Iterates over batches of a prepared dataset; see the module docstring."""

  def __init__(self, data, *, batch_size: int, max_length: int | None = None, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None, buckets: Sequence[int] | None = None,
               packing: bool = False, nll_target: NllTarget = "sequence", drop_remainder: bool = True,
               process_index: int = 0, process_count: int = 1, state: dict | None = None):
    self.kind = data.kind
    self.examples = list(data.examples)
    if not self.examples:
      raise DataError(f"{data.path}: no examples to iterate over")
    self.max_length = max_length or data.policy.max_length
    self.batch_size = int(batch_size)
    self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
    self.buckets = tuple(buckets) if buckets else length_buckets(self.max_length)
    self.packing, self.nll_target, self.drop_remainder = bool(packing), nll_target, bool(drop_remainder)
    self.process_index, self.process_count = int(process_index), int(process_count)
    if self.packing and self.kind != "sft":
      raise ConfigError("packing is for SFT data; preference batches pair chosen and rejected rows")
    if self.batch_size < 1:
      raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    rows = self.batch_size * (2 if self.kind == "preference" else 1)
    if not 0 <= self.process_index < self.process_count or rows % self.process_count:
      raise ConfigError(f"a global batch of {rows} rows cannot be split over {self.process_count} hosts "
                        f"(process_index={self.process_index}); use a batch size they divide")
    if max(self.buckets) < self.max_length:
      raise ConfigError(f"the largest length bucket {max(self.buckets)} is below max_length={self.max_length}")
    self._lengths = np.array([_length(ex) for ex in self.examples])
    if self._lengths.max() > self.max_length:
      raise ConfigError(f"an example has {self._lengths.max()} tokens, more than max_length={self.max_length}")
    if not self.packing and self.drop_remainder and len(self.examples) < self.batch_size:
      raise DataError(f"{data.path}: {len(self.examples)} examples, fewer than one batch of {self.batch_size}; "
                      "lower the batch size or add data")
    self.fingerprint = fingerprint(self.examples)
    self.epoch, self.position, self.batches = 0, 0, 0
    self._order_epoch, self._order = -1, None
    if state is not None:
      self.set_state(state)

  # -- state ---------------------------------------------------------------------------------------------

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "kind": self.kind, "epoch": self.epoch, "position": self.position,
            "batches": self.batches, "seed": self.seed, "shuffle": self.shuffle, "packing": self.packing,
            "num_examples": len(self.examples), "fingerprint": self.fingerprint}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise DataError(f"data iterator state: expected version {STATE_VERSION}, got {state!r:.200}")
    for key, mine in (("kind", self.kind), ("seed", self.seed), ("shuffle", self.shuffle),
                      ("packing", self.packing), ("num_examples", len(self.examples)),
                      ("fingerprint", self.fingerprint)):
      if state.get(key) != mine:
        raise DataError(f"data iterator state: saved with {key}={state.get(key)!r} but this run has {mine!r}; "
                        "resuming would not continue the same data order (same file, template, tokenizer, "
                        "length policy and seed are needed)")
    self.epoch, self.position, self.batches = int(state["epoch"]), int(state["position"]), int(state["batches"])

  # -- iteration -----------------------------------------------------------------------------------------

  def __iter__(self):
    return self

  @property
  def steps_per_epoch(self) -> int | None:
    """Batches per epoch, when known without packing."""
    if self.packing:
      return None
    n, b = len(self.examples), self.batch_size
    return n // b if self.drop_remainder else -(-n // b)

  def _order_for(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      n = len(self.examples)
      self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      self._order_epoch = epoch
    return self._order

  def _plan(self) -> list[list[int]]:
    """Example indices of each global row (or pair) of the next batch, advancing epoch and position."""
    while True:
      if self.num_epochs is not None and self.epoch >= self.num_epochs:
        raise StopIteration
      order, n = self._order_for(self.epoch), len(self.examples)
      if self.packing:
        lengths = self._lengths[order]
        groups, pos = [], self.position
        while len(groups) < self.batch_size and pos < n:
          end = pack_next_row(lengths, pos, self.max_length)
          groups.append([int(i) for i in order[pos:end]])
          pos = end
      else:
        pos = min(self.position + self.batch_size, n)
        groups = [[int(i)] for i in order[self.position:pos]]
      full = len(groups) == self.batch_size
      if full or (groups and not self.drop_remainder):
        self.position = pos
        if pos >= n:
          self.epoch, self.position = self.epoch + 1, 0
        return groups + [[] for _ in range(self.batch_size - len(groups))]
      if self.position == 0:  # a whole epoch cannot fill one batch: every later epoch is the same
        raise DataError(f"{len(self.examples)} examples pack into {len(groups)} rows, fewer than one batch of "
                        f"{self.batch_size}; lower the batch size or add data")
      self.epoch, self.position = self.epoch + 1, 0  # too few left for a batch: next epoch

  def __next__(self) -> dict[str, np.ndarray]:
    groups = self._plan()
    self.batches += 1
    ex = self.examples
    if self.kind == "preference":
      rows = preference_rows([ex[g[0]] if g else None for g in groups], self.nll_target)
    elif self.packing:
      rows = [sum((sequence_rows([ex[i]]) [0] for i in g), []) for g in groups]
    else:
      rows = sequence_rows([ex[g[0]] if g else None for g in groups])
    length = bucket_for(max(row_length(r) for r in rows), self.buckets)
    per_host = len(rows) // self.process_count
    local = rows[self.process_index * per_host:(self.process_index + 1) * per_host]
    return pad_rows(local, length, nll_mask=self.kind == "preference", packed=self.packing)


def _length(ex) -> int:
  if hasattr(ex, "chosen"):
    return len(ex.prompt) + max(len(ex.chosen), len(ex.rejected))
  return len(ex.ids)
