"""The optimizer: AdamW after global-norm clipping, with warmup + cosine / linear / inverse-sqrt / constant.

The learning rate at update `i` (0-based; the count optax keeps) follows HF transformers' schedulers, so a
recipe ported from TRL or LLaMA-Factory means the same thing here:

    warmup W:      lr * i / W                        for i < W (the first update has lr 0 when W > 0)
    cosine:        lr * (m + (1 - m) * 0.5 * (1 + cos(pi * p)))     p = (i - W) / (N - W), m = min_lr_ratio
    linear:        lr * (m + (1 - m) * (1 - p))
    inverse_sqrt:  lr * sqrt(W / i)                  (HF: timescale W, or 10_000 without warmup)
    constant:      lr

Weight decay is decoupled (AdamW) and by default skips norm scales and the embedding table (a mask on the
parameter tree), as most fine-tuning recipes do.

Frozen parameters (`optim.freeze`: comma-separated regular expressions searched in each parameter's path,
e.g. "embedder" or "layer_(0|1)/"; paths are the tree's keys joined by "/", as `embedder/input_embedding` or
`layer_3/mlp/linear`): `trainable_mask` marks them, and the optimizer runs on the rest only (see
`state.trainable_part`), so they get no gradient, no update, no Adam moments and no weight decay.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gemma_jax.errors import ConfigError

SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")
NO_DECAY_LEAVES = ("scale", "input_embedding")  # norm scales (zero-centred) and the tied embedding


def warmup_steps(warmup: float, num_steps: int) -> int:
  """`warmup` < 1 is a fraction of `num_steps` (rounded up, as HF's warmup_ratio), else a step count."""
  if warmup < 0:
    raise ConfigError(f"optim.warmup={warmup}: must be >= 0 (a fraction < 1 of the steps, or a step count)")
  if warmup < 1:
    return int(math.ceil(warmup * num_steps))
  if warmup != int(warmup):
    raise ConfigError(f"optim.warmup={warmup}: a value >= 1 is a number of steps and must be an integer")
  return int(warmup)


def make_schedule(*, lr: float, schedule: str, num_steps: int, warmup: float = 0.0,
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
  """The learning rate as a function of the update count (see the module docstring)."""
  if schedule not in SCHEDULES:
    raise ConfigError(f"optim.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
  if num_steps <= 0:
    raise ConfigError(f"num_steps={num_steps}: must be > 0")
  if not 0.0 <= min_lr_ratio <= 1.0:
    raise ConfigError(f"optim.min_lr_ratio={min_lr_ratio}: must be in [0, 1]")
  w = warmup_steps(warmup, num_steps)
  decay_steps = max(1, num_steps - w)
  m = min_lr_ratio

  def fn(count):
    i = jnp.asarray(count, jnp.float32)
    warm = lr * i / max(w, 1)
    p = jnp.clip((i - w) / decay_steps, 0.0, 1.0)
    if schedule == "cosine":
      after = lr * (m + (1.0 - m) * 0.5 * (1.0 + jnp.cos(jnp.pi * p)))
    elif schedule == "linear":
      after = lr * (m + (1.0 - m) * (1.0 - p))
    elif schedule == "inverse_sqrt":
      timescale = w if w > 0 else 10_000
      after = lr * jax.lax.rsqrt(jnp.maximum(i + (timescale - w), 1.0) / timescale)
    else:
      after = jnp.full_like(i, lr)
    return jnp.where(i < w, warm, after)

  return fn


def decay_mask(params: Any, *, decay_norms_and_embeddings: bool = False) -> Any:
  """Tree of bools: True where weight decay applies (every leaf, or all but norms and the embedding)."""
  def keep(path, _):
    if decay_norms_and_embeddings:
      return True
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return name not in NO_DECAY_LEAVES
  return jax.tree_util.tree_map_with_path(keep, params)


def param_path(path) -> str:
  """A tree path as "embedder/input_embedding"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def trainable_mask(params: Any, freeze: str = "") -> Any | None:
  """Tree of bools: False where a leaf's path matches one of the comma-separated patterns of `freeze`; None
  (everything trains) when `freeze` is empty.

  Every pattern must match at least one parameter and at least one parameter must stay trainable (a
  ConfigError naming `optim.freeze` otherwise): a typo never silently trains everything.
  """
  patterns = [p.strip() for p in freeze.split(",") if p.strip()]
  if not patterns:
    return None
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ConfigError(f"optim.freeze: {p!r} is not a regular expression ({e})") from None
  paths = [param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for p, rx in zip(patterns, compiled):
    if not any(rx.search(q) for q in paths):
      raise ConfigError(f"optim.freeze: {p!r} matches no parameter (paths look like {paths[0]!r}, {paths[-1]!r})")
  mask = jax.tree_util.tree_map_with_path(lambda path, _: not any(rx.search(param_path(path)) for rx in compiled),
                                          params)
  if not any(jax.tree.leaves(mask)):
    raise ConfigError(f"optim.freeze={freeze!r} freezes every parameter: nothing would train")
  return mask


def make_optimizer(*, lr: float, schedule: str = "cosine", num_steps: int, warmup: float = 0.0,
                   min_lr_ratio: float = 0.0, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: float | None = 1.0,
                   decay_norms_and_embeddings: bool = False) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled decay, masked) after global-norm clipping; returns (optimizer, schedule).

  clip_norm: None or <= 0 turns clipping off. The schedule is returned for logging the current rate.
  """
  if lr <= 0:
    raise ConfigError(f"optim.lr={lr}: must be > 0")
  if weight_decay < 0:
    raise ConfigError(f"optim.weight_decay={weight_decay}: must be >= 0")
  sched = make_schedule(lr=lr, schedule=schedule, num_steps=num_steps, warmup=warmup, min_lr_ratio=min_lr_ratio)
  mask = lambda p: decay_mask(p, decay_norms_and_embeddings=decay_norms_and_embeddings)
  parts = []
  if clip_norm is not None and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
  return optax.chain(*parts), sched


def optimizer_from_config(optim_config, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`make_optimizer` from the run config's `optim` section (an ml_collections ConfigDict or a dict)."""
  c = dict(optim_config)
  return make_optimizer(lr=float(c["lr"]), schedule=c.get("schedule", "cosine"), num_steps=num_steps,
                        warmup=float(c.get("warmup", 0.0)), min_lr_ratio=float(c.get("min_lr_ratio", 0.0)),
                        weight_decay=float(c.get("weight_decay", 0.0)), b1=float(c.get("b1", 0.9)),
                        b2=float(c.get("b2", 0.999)), eps=float(c.get("eps", 1e-8)),
                        clip_norm=c.get("clip_norm", 1.0),
                        decay_norms_and_embeddings=bool(c.get("decay_norms_and_embeddings", False)))
