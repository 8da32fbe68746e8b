"""Length policy: how prompts and responses are fitted into `max_length` tokens, and what is counted.

A prompt is `[BOS] body [generation prompt]`; when it is longer than `max_prompt_length` its body is cut,
keeping the end (`keep_end`, the default: the last turns matter most) or the start (`keep_start`); BOS and the
generation prompt `<start_of_turn>model\\n` always stay. A pair or sequence whose prompt alone does not fit
(no room for one response token) is dropped and counted. The response budget is `max_length - len(prompt)`
for each response separately (not TRL's `max_length - longer response`, which empties the shorter one).
A response longer than its budget loses only trailing non-target tokens (the newline after `<end_of_turn>`)
for free; otherwise it is dropped and counted (`response_truncation="drop"`, the default, so the
`<end_of_turn>` target is never silently lost) or, when asked (`"cut"`), cut to the budget and counted.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from gemma_jax.errors import ConfigError

PROMPT_TRUNCATION = ("keep_end", "keep_start")
RESPONSE_TRUNCATION = ("drop", "cut")


@dataclasses.dataclass(frozen=True)
class LengthPolicy:
  max_length: int
  max_prompt_length: int | None = None  # None: prompts are never cut, only dropped when they do not fit
  prompt_truncation: Literal["keep_end", "keep_start"] = "keep_end"
  response_truncation: Literal["drop", "cut"] = "drop"

  def __post_init__(self):
    if not isinstance(self.max_length, int) or self.max_length < 2:
      raise ConfigError(f"max_length={self.max_length!r}: must be an integer >= 2")
    if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
      raise ConfigError(f"max_prompt_length={self.max_prompt_length!r}: must be between 1 and max_length - 1 "
                        f"({self.max_length - 1})")
    if self.prompt_truncation not in PROMPT_TRUNCATION:
      raise ConfigError(f"prompt_truncation={self.prompt_truncation!r}: use one of {', '.join(PROMPT_TRUNCATION)}")
    if self.response_truncation not in RESPONSE_TRUNCATION:
      raise ConfigError(f"response_truncation={self.response_truncation!r}: use one of "
                        f"{', '.join(RESPONSE_TRUNCATION)}")


def truncate_prompt(ids: np.ndarray, policy: LengthPolicy, *, head: int, tail: int) -> tuple[np.ndarray, bool]:
  """Cuts the prompt body to `max_prompt_length`, keeping `head` leading and `tail` trailing ids.

  Returns (ids, truncated).
  """
  limit = policy.max_prompt_length
  if limit is None or len(ids) <= limit:
    return ids, False
  keep = limit - head - tail
  if keep < 0:
    raise ConfigError(f"max_prompt_length={limit} is shorter than BOS + the generation prompt ({head + tail} tokens)")
  body = ids[head:len(ids) - tail]
  body = body[len(body) - keep:] if policy.prompt_truncation == "keep_end" else body[:keep]
  return np.concatenate([ids[:head], body, ids[len(ids) - tail:]]), True


def fit_response(ids: np.ndarray, target: np.ndarray, budget: int,
                 policy: LengthPolicy) -> tuple[np.ndarray, np.ndarray, str]:
  """Fits a response into `budget` tokens. Returns (ids, target, status), status "ok" | "cut" | "drop"."""
  if len(ids) <= budget:
    return ids, target, "ok"
  last = int(np.flatnonzero(target)[-1]) + 1 if target.any() else 0
  if last <= budget:  # only trailing non-targets (the newline after <end_of_turn>) are lost
    return ids[:budget], target[:budget], "ok"
  if policy.response_truncation == "cut" and target[:budget].any():
    return ids[:budget], target[:budget], "cut"
  return ids, target, "drop"


@dataclasses.dataclass
class PrepStats:
  """What preparing a dataset did: counts and token lengths (of the kept examples, after truncation)."""

  records: int = 0
  invalid: int = 0
  kept: int = 0
  dropped_prompt_too_long: int = 0
  dropped_response_too_long: int = 0
  truncated_prompts: int = 0
  truncated_responses: int = 0
  lengths: dict[str, list[int]] = dataclasses.field(default_factory=dict)

  def merge(self, other: PrepStats) -> None:
    for f in ("records", "invalid", "kept", "dropped_prompt_too_long", "dropped_response_too_long",
              "truncated_prompts", "truncated_responses"):
      setattr(self, f, getattr(self, f) + getattr(other, f))
    for k, v in other.lengths.items():
      self.lengths.setdefault(k, []).extend(v)

  def add_length(self, name: str, n: int) -> None:
    self.lengths.setdefault(name, []).append(int(n))

  def percentiles(self, name: str, qs=(50, 90, 95, 99, 100)) -> dict[int, int]:
    v = np.asarray(self.lengths.get(name, []))
    if v.size == 0:
      return {}
    return {q: int(np.percentile(v, q, method="higher")) for q in qs}

  def to_dict(self) -> dict:
    d = {k: v for k, v in dataclasses.asdict(self).items() if k != "lengths"}
    d["lengths"] = {k: self.percentiles(k) for k in self.lengths}
    return d
