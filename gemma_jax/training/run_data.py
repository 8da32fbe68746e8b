"""The run's data: the training iterator and the held-out set, built from the run config.

Thin glue over `gemma_jax.data`: files are read, validated and tokenized with the run's template once at
start; the training iterator shuffles by `seed`, repeats over epochs, gives each host its rows of every global
batch, and saves/restores its position with the run checkpoints. Held-out batches are read in file order;
a last partial held-out batch is filled with empty rows (all masks False), which the eval step does not count.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import ml_collections
import numpy as np

from gemma_jax import data as data_lib
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.templates import ChatTemplate
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.training import objectives


@dataclasses.dataclass
class RunData:
  kind: str  # "preference" or "sft"
  train: data_lib.DataIterator
  train_examples: int
  eval_data: data_lib.PreparedData | None
  micro_batch: int  # examples (pairs) per microbatch, all hosts together
  process_index: int
  process_count: int
  packing: bool
  train_stats: data_lib.PrepStats | None = None
  policy: data_lib.LengthPolicy | None = None

  def summary(self) -> str:
    """One line: what the training (and held-out) data became."""
    what = "pairs" if self.kind == "preference" else "examples"
    line = f"data: {self.train_examples} training {what}"
    if self.train_stats is not None:
      line += f" from {self.train_stats.records} records"
      if dropped(self.train_stats) or self.train_stats.truncated_prompts or self.train_stats.truncated_responses:
        line += f" ({describe_losses(self.train_stats, self.policy)})"
    if self.eval_data is not None:
      line += f"; {len(self.eval_data.examples)} held-out"
    return line

  def steps_per_epoch(self, batch_size: int) -> int:
    """Optimizer steps per epoch for `batch_size` examples per step."""
    if self.packing:
      raise ConfigError("with data.packing the number of batches per epoch is not known in advance; set "
                        "num_steps")
    steps = self.train_examples // batch_size
    if steps == 0:
      raise ConfigError(f"the training set has {self.train_examples} examples, fewer than batch_size="
                        f"{batch_size}; lower batch_size or add data")
    return steps

  def max_targets(self) -> int | None:
    """The most target tokens in any training or held-out row (a response, or an SFT example's targets),
    rounded up to a multiple of 8: the static bound of the loss's target-positions head. None with packing
    (a packed row holds several examples)."""
    if self.packing:
      return None
    examples = list(self.train.examples) + (list(self.eval_data.examples) if self.eval_data is not None else [])
    most = max(_target_count(ex) for ex in examples)
    return max(8, -(-most // 8) * 8)

  @property
  def has_eval(self) -> bool:
    return self.eval_data is not None

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of each held-out batch, in file order, one pass; the last one padded with empty rows."""
    if self.eval_data is None:
      return iter(())
    return data_lib.DataIterator(self.eval_data, batch_size=self.micro_batch, shuffle=False, num_epochs=1,
                                 drop_remainder=False, process_index=self.process_index,
                                 process_count=self.process_count)

  def sample_prompts(self, n: int) -> list[np.ndarray]:
    """Prompt ids (BOS ... generation prompt) of the first `n` held-out examples (training ones without)."""
    examples = (self.eval_data.examples if self.eval_data is not None else self.train.examples)[:n]
    return [np.asarray(ex.prompt if hasattr(ex, "prompt") else _sft_prompt(ex)) for ex in examples]


def _target_count(ex) -> int:
  """Target tokens of one row of `ex`: the longer response of a pair, or a sequence's targets."""
  if hasattr(ex, "chosen_target"):
    return int(max(np.sum(ex.chosen_target), np.sum(ex.rejected_target)))
  return int(np.sum(ex.target))


def _sft_prompt(ex) -> np.ndarray:
  """The ids before the first target token of an SFT example (its prompt, generation prompt included)."""
  first = int(np.argmax(ex.target)) if np.any(ex.target) else len(ex.ids)
  return ex.ids[:first]


def _prepare(paths: str, kind: str, template: ChatTemplate, tokenizer: Tokenizer,
             policy: data_lib.LengthPolicy, skip_invalid: bool, max_dropped: float) -> data_lib.PreparedData:
  """Every file of `paths` prepared; a file losing more than `max_dropped` of its records is refused."""
  parts = [p.strip() for p in paths.split(",") if p.strip()]
  prepared = []
  for p in parts:
    d = data_lib.prepare_dataset(p, kind=kind, template=template, tokenizer=tokenizer, policy=policy,
                                 skip_invalid=skip_invalid)
    lost = dropped(d.stats)
    if d.stats.records and lost / d.stats.records > max_dropped:
      raise DataError(f"{p}: {lost} of {d.stats.records} records would be dropped ({describe_losses(d.stats, policy)}),"
                      f" more than data.max_dropped_fraction={max_dropped}; raise data.max_length, shorten or fix "
                      "the records (`python -m gemma_jax.data.inspect` lists them), or raise max_dropped_fraction")
    prepared.append(d)
  first = prepared[0]
  if len(prepared) == 1:
    return first
  stats = data_lib.PrepStats()
  for d in prepared:
    stats.merge(d.stats)
  return dataclasses.replace(first, path=paths, examples=[ex for p in prepared for ex in p.examples],
                             invalid=[x for p in prepared for x in p.invalid], stats=stats)


def dropped(stats: data_lib.PrepStats) -> int:
  """Records that did not become examples: too long for max_length, or malformed and skipped."""
  return stats.dropped_prompt_too_long + stats.dropped_response_too_long + stats.invalid


def describe_losses(stats: data_lib.PrepStats, policy: data_lib.LengthPolicy) -> str:
  parts = [f"{stats.dropped_prompt_too_long + stats.dropped_response_too_long} too long for "
           f"max_length={policy.max_length}"]
  if stats.invalid:
    parts.append(f"{stats.invalid} malformed, skipped")
  if stats.truncated_prompts or stats.truncated_responses:
    parts.append(f"{stats.truncated_prompts + stats.truncated_responses} truncated")
  return ", ".join(parts)


def build(config: ml_collections.ConfigDict, tokenizer: Tokenizer, template: ChatTemplate, *, micro_batch: int,
          process_index: int, process_count: int) -> RunData:
  """The training iterator (at its start; the loop restores its state on resume) and the held-out set."""
  if not config.data.train:
    raise ConfigError("data.train is empty: set --config.data.train=FILE (JSONL, JSON or Parquet; "
                      "check it with `python -m gemma_jax.data.inspect FILE`)")
  kind = objectives.get(config.objective).data_kind
  policy = data_lib.LengthPolicy(max_length=int(config.data.max_length))
  opts = dict(skip_invalid=bool(config.data.skip_invalid), max_dropped=float(config.data.max_dropped_fraction))
  train = _prepare(config.data.train, kind, template, tokenizer, policy, **opts)
  eval_data = _prepare(config.data.eval, kind, template, tokenizer, policy, **opts) if config.data.eval else None
  if eval_data is None and config.data.eval_fraction > 0:
    n = len(train.examples)
    held = int(round(n * config.data.eval_fraction))
    if not 0 < held < n:
      raise ConfigError(f"data.eval_fraction={config.data.eval_fraction} of {n} examples leaves no "
                        "training or no held-out examples")
    order = np.random.default_rng([config.seed, 7919]).permutation(n)
    held_idx = set(order[:held].tolist())
    eval_data = dataclasses.replace(train, examples=[e for i, e in enumerate(train.examples) if i in held_idx])
    train = dataclasses.replace(train, examples=[e for i, e in enumerate(train.examples) if i not in held_idx])
  if eval_data is not None and len(eval_data.examples) < micro_batch:
    raise DataError(f"held-out set {eval_data.path}: {len(eval_data.examples)} examples, fewer than one batch "
                    f"({micro_batch}); add examples or lower batch_size")
  packing = bool(config.data.packing)
  if packing and kind != "sft":
    raise ConfigError("data.packing is for the sft objective only")
  if not packing and len(train.examples) < micro_batch:
    raise DataError(f"training set {train.path}: {len(train.examples)} usable examples, fewer than one microbatch "
                    f"(batch_size / grad_accum = {micro_batch}); lower batch_size or add data")
  iterator = data_lib.DataIterator(train, batch_size=micro_batch, seed=config.seed, shuffle=config.data.shuffle,
                                   packing=packing, process_index=process_index, process_count=process_count)
  return RunData(kind=kind, train=iterator, train_examples=len(train.examples), eval_data=eval_data,
                 micro_batch=micro_batch, process_index=process_index, process_count=process_count,
                 packing=packing, train_stats=train.stats, policy=policy)
