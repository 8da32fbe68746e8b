"""Low-rank adapters (LoRA, as HF peft computes them): `y = x W + scale * (x A) B` on chosen projections.

A projection is named as peft names its Linear: q, k, v, o (attention), gate, up, down (MLP). Our weights
stack some of them (`kv_einsum` [2, K, D, H] holds k and v, `gating_einsum` [2, F, D] gate and up), so an
adapter belongs to one *slot* of a weight: each `Einsum` knows the projection names of its slots (`SLOTS`).

Shapes, for a weight whose einsum reads `x` on its contracted letters I and writes its output letters O (the
stacking letter C aside), rank r:

    lora_<slot>_a   [*I, r]    e.g. q_einsum 'BTD,NDH->BTNH': a [D, r], b [r, N, H]
    lora_<slot>_b   [r, *O]         attn_vec_einsum 'BTNH,NHD->BTD': a [N, H, r], b [r, D]

They are parameters of the model's `Einsum` (beside its weight, so they shard with it, see `layers.Einsum`)
when `TransformerConfig.lora_rank > 0`; `split` / `attach` move them between one tree and the base + adapters
pair (no array is copied). Init as peft's default: a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with
a = sqrt(5)), b = 0, so a fresh adapter leaves the model exactly as it was. scale = alpha / r, or alpha / sqrt(r)
with rsLoRA. Every function here is pure.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from gemma_jax.errors import ConfigError

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# The projection each slot of a weight is, by the weight's name (its module's, or the MLP's param names).
SLOTS = {"q_einsum": ("q",), "kv_einsum": ("k", "v"), "qkv_einsum": ("q", "k", "v"), "k_einsum": ("k",),
         "attn_vec_einsum": ("o",), "gating_einsum": ("gate", "up"), "linear": ("down",)}
PREFIX = "lora_"
STACK_LETTER = "C"  # an einsum letter that stacks projections (kv_einsum's [2, ...]): one adapter per slot


def leaf_name(slot: str, which: str) -> str:
  """The parameter name of a slot's adapter matrix: `lora_q_a`, `lora_q_b`."""
  return f"{PREFIX}{slot}_{which}"


def is_adapter_name(name: str) -> bool:
  return isinstance(name, str) and name.startswith(PREFIX)


# ---------------------------------------------------------------------------------------------------------
# Which projections carry adapters


def parse_targets(targets: str) -> tuple[str, ...]:
  """Comma-separated target patterns, with peft's names mapped to ours ("q_proj" -> "q", "all-linear" -> all)."""
  out = []
  for item in (t.strip() for t in targets.split(",")):
    if not item:
      continue
    if item == "all-linear":
      out.extend(PROJECTIONS)
      continue
    out.append(re.sub(r"_proj\b", "", item))
  return tuple(out)


def targeted(patterns: Iterable[str], layer: int, projection: str) -> bool:
  """Whether a pattern names the projection of this layer: a pattern fully matches the projection's name
  ("q", "q|v") or "layer_<i>/<name>" ("layer_1[0-7]/(q|v)")."""
  path = f"layer_{layer}/{projection}"
  return any(re.fullmatch(p, projection) or re.fullmatch(p, path) for p in patterns)


def check_targets(targets: str, num_layers: int) -> None:
  """A ConfigError naming `lora_targets` when a pattern is not a regular expression or names nothing."""
  patterns = parse_targets(targets)
  if not patterns:
    raise ConfigError(f"lora_targets={targets!r}: name at least one projection ({', '.join(PROJECTIONS)}, or "
                      "peft's q_proj, ..., all-linear)")
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ConfigError(f"lora_targets: {p!r} is not a regular expression ({e})") from None
    if not any(targeted([p], i, n) for i in range(num_layers) for n in PROJECTIONS):
      raise ConfigError(f"lora_targets: {p!r} names no projection (use {', '.join(PROJECTIONS)}, or "
                        f"'layer_<i>/<name>' patterns for layers 0..{num_layers - 1})")


def scale(alpha: float, rank: int, rslora: bool = False) -> float:
  """peft's scaling: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
  return alpha / (rank ** 0.5 if rslora else rank)


# ---------------------------------------------------------------------------------------------------------
# The math, by einsum equation


def _letters(eqn: str) -> tuple[str, str, str]:
  lhs, rest = eqn.split(",")
  w, out = rest.split("->")
  return lhs, w, out


def slot_eqn(eqn: str) -> str:
  """The equation of one slot of a stacked weight: 'BTD,CKDH->CBTKH' -> 'BTD,KDH->BTKH'."""
  return eqn.replace(STACK_LETTER, "")


def adapter_shapes(eqn: str, w_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(a shape, b shape) of one slot's adapter for a weight of `w_shape` entering `eqn`."""
  lhs, w, _ = _letters(eqn)
  dims = dict(zip(w, w_shape))
  contracted = [dims[ch] for ch in w if ch in lhs]
  outputs = [dims[ch] for ch in w if ch not in lhs and ch != STACK_LETTER]
  return tuple(contracted) + (rank,), (rank,) + tuple(outputs)


def adapter_axes(eqn: str, w_axes: tuple[str | None, ...]) -> tuple[tuple, tuple]:
  """Logical axes of a slot's (a, b), from the weight's: the rank axis is replicated."""
  lhs, w, _ = _letters(eqn)
  named = dict(zip(w, w_axes))
  return (tuple(named[ch] for ch in w if ch in lhs) + (None,),
          (None,) + tuple(named[ch] for ch in w if ch not in lhs and ch != STACK_LETTER))


def init_a(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """peft's default init of lora_A (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  fan_in = 1
  for n in shape[:-1]:
    fan_in *= n
  bound = fan_in ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def delta(eqn: str, x: jax.Array, a: jax.Array, b: jax.Array, factor: float) -> jax.Array:
  """`factor * (x a) b` for one slot: the output of `slot_eqn(eqn)`, in x's dtype (peft's order)."""
  lhs, w, out = _letters(slot_eqn(eqn))
  contracted = "".join(ch for ch in w if ch in lhs)
  produced = "".join(ch for ch in w if ch not in lhs)
  rest = "".join(ch for ch in lhs if ch not in contracted)
  u = jnp.einsum(f"{lhs},{contracted}r->{rest}r", x, a.astype(x.dtype))
  y = jnp.einsum(f"{rest}r,r{produced}->{out}", u, b.astype(x.dtype))
  return y * jnp.asarray(factor, x.dtype)


def apply(eqn: str, y: jax.Array, x: jax.Array, adapters: dict[int, tuple[jax.Array, jax.Array]],
          factor: float) -> jax.Array:
  """`y` (the weight's output for `eqn`) plus each adapted slot's `delta`; adapters: {slot index: (a, b)}."""
  stacked = STACK_LETTER in _letters(eqn)[1]
  for index, (a, b) in sorted(adapters.items()):
    d = delta(eqn, x, a, b, factor).astype(y.dtype)
    y = y.at[index].add(d) if stacked else y + d
  return y


def fold(eqn: str, w: jax.Array, adapters: dict[int, tuple[jax.Array, jax.Array]], factor: float) -> jax.Array:
  """The weight with the adapters folded in: w[slot] + factor * a b, computed in f32, returned in w's dtype."""
  lhs, letters, _ = _letters(eqn)
  one = letters.replace(STACK_LETTER, "")
  contracted = "".join(ch for ch in one if ch in lhs)
  produced = "".join(ch for ch in one if ch not in lhs)
  out = w.astype(jnp.float32)
  for index, (a, b) in sorted(adapters.items()):
    d = jnp.einsum(f"{contracted}r,r{produced}->{one}", a.astype(jnp.float32), b.astype(jnp.float32)) * factor
    out = out.at[index].add(d) if STACK_LETTER in letters else out + d
  return out.astype(w.dtype)


# ---------------------------------------------------------------------------------------------------------
# Trees: one params tree <-> base + adapters


def split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(base, adapters): the same nested dicts, the adapter leaves in the second (empty dicts dropped)."""
  base, adapters = {}, {}
  for k, v in params.items():
    if isinstance(v, dict):
      b, a = split(v)
      base[k] = b
      if a:
        adapters[k] = a
    elif is_adapter_name(k):
      adapters[k] = v
    else:
      base[k] = v
  return base, adapters


def attach(base: dict[str, Any], adapters: dict[str, Any] | None) -> dict[str, Any]:
  """One tree of `base` with `adapters` beside their weights (new dicts, the same arrays)."""
  if not adapters:
    return base
  out = dict(base)
  for k, v in adapters.items():
    if isinstance(v, dict):
      if not isinstance(base.get(k), dict):
        raise ConfigError(f"adapter group {k!r} has no such module in the base model")
      out[k] = attach(base[k], v)
    else:
      out[k] = v
  return out


def adapter_mask(params: dict[str, Any]) -> Any:
  """Tree of bools like `params`: True at the adapter leaves (what trains)."""
  return {k: adapter_mask(v) if isinstance(v, dict) else is_adapter_name(k) for k, v in params.items()}


def scale_b(params: dict[str, Any], weight: float) -> dict[str, Any]:
  """`params` with every adapter's b times `weight`: the adapted model moved toward the base (0: the base)."""
  return {k: scale_b(v, weight) if isinstance(v, dict)
          else (v * jnp.asarray(weight, v.dtype) if is_adapter_name(k) and k.endswith("_b") else v)
          for k, v in params.items()}
