"""How the sampler stores the weights for decoding, and how its programs read them back: one `WeightLayout`.

    WeightLayout.for_backend(config, sharding, packed)  -> layout (decided once, here)
    stored = layout.store(params)                       -> what the Sampler keeps and the programs take
    Transformer(config, sharding, matmul=layout.matmul) -> the model, reading `layout.model_view(stored)`

Kinds:
  packed         CPU, unsharded, f32, the kernel built: every matmul weight in `packed_matmul` panels (same tree,
                 same shapes), multiplied by the kernel (`PackedMatmul`).
  loop           CPU, unsharded, XLA's matmuls: the attention weights stored transposed (the loop layout).
  loop_per_call  CPU, sharded: stored as the model's (their shardings stay the model's); the decode loop puts
                 them in the loop layout once per call.
  plain          other backends: the params as they are.

Why the loop layout: XLA CPU copies the q/kv/attn_vec weights into its GEMM layout wherever they are used,
inside the decode loop on every step (loop-invariant code motion leaves a lone transpose in the body) and once
per prefill call. Kept transposed and viewed back inside the programs (`from_loop_layout`), the transpose
becomes a free bitcast into the GEMM's preferred layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gemma_jax.errors import UserError
from gemma_jax.kernels import packed_matmul
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.layers import XLA, Matmul, tied_logits
from gemma_jax.model.params import MATMUL_EQNS
from gemma_jax.model.sharding import ShardingContext

HEAD_EQN = "BTD,VD->BTV"  # the tied output head, as the table [V, D] is packed
# The einsum each matmul weight enters (by parameter name), for `pack_params`.
WEIGHT_EQNS = {"input_embedding": HEAD_EQN, **MATMUL_EQNS}
# The loop layout: the axis order each attention weight is stored in (`to_loop_layout`).
LOOP_LAYOUTS = {"q_einsum": (1, 0, 2), "kv_einsum": (0, 1, 3, 2), "qkv_einsum": (0, 1, 3, 2),
                "k_einsum": (1, 0, 2), "attn_vec_einsum": (1, 0, 2)}
KINDS = ("packed", "loop", "loop_per_call", "plain")


def weight_name(path) -> str | None:
  """A params leaf's name from its tree path: the module's for an `Einsum` (`.../q_einsum/w` -> 'q_einsum'),
  else the leaf's own ('input_embedding', 'gating_einsum', 'scale', ...)."""
  names = [getattr(k, "key", None) for k in path]
  return names[-2] if names[-1] == "w" and len(names) >= 2 else names[-1]


def can_pack(config: TransformerConfig) -> bool:
  """Whether the packed kernel can run `config` here: f32 params and compute, and the kernel built."""
  f32 = jnp.dtype(config.dtype) == jnp.float32 and jnp.dtype(config.param_dtype) == jnp.float32
  return f32 and packed_matmul.available()


def pack_params(params: dict) -> dict:
  """Every matmul weight of `params` in `packed_matmul` panels (same tree, same shapes), for `PackedMatmul`."""
  def pack(path, x):
    name = weight_name(path)
    return packed_matmul.pack(WEIGHT_EQNS[name], x) if name in WEIGHT_EQNS else x
  return jax.tree_util.tree_map_with_path(pack, params)


def _loop_perm(path) -> tuple[int, ...] | None:
  return LOOP_LAYOUTS.get(weight_name(path)) if getattr(path[-1], "key", None) == "w" else None


def to_loop_layout(params: Any) -> Any:
  """The params with the attention weights physically transposed (`LOOP_LAYOUTS`); the rest unchanged."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _loop_perm(path) is None else jnp.transpose(x, _loop_perm(path)), params)


def from_loop_layout(params: Any) -> Any:
  """Inverse of `to_loop_layout`: the params as the model reads them."""
  def back(path, x):
    order = _loop_perm(path)
    return x if order is None else jnp.transpose(x, tuple(sorted(range(len(order)), key=order.__getitem__)))
  return jax.tree_util.tree_map_with_path(back, params)


@dataclasses.dataclass(frozen=True)
class PackedMatmul(Matmul):
  """The model's matmul hook for `pack_params` weights (f32): products through the packed kernel, embedding
  rows by one gather from the packed table."""

  def einsum(self, eqn: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """`jnp.einsum(eqn, x, unpack(w))` in f32; a leading '...' on x and the output is allowed."""
    if not eqn.startswith("..."):
      return packed_matmul.einsum(eqn, x, w)
    explicit = len(eqn.split(",")[0]) - 3
    lead = x.shape[:x.ndim - explicit]
    y = packed_matmul.einsum(eqn.replace("...", "Z"), x.reshape((-1,) + x.shape[x.ndim - explicit:]), w)
    return y.reshape(lead + y.shape[1:])

  def take(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
    return packed_matmul.take_columns(HEAD_EQN, table, tokens)


PACKED = PackedMatmul()
_store_packed = jax.jit(pack_params)
_store_loop = jax.jit(to_loop_layout)


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  """The sampler's weight layout (one of `KINDS`, see the module doc): hashable, so compiled programs are
  shared by layout."""

  kind: str

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"weight layout {self.kind!r}: expected one of {KINDS}")

  @classmethod
  def for_backend(cls, config: TransformerConfig, sharding: ShardingContext | None = None,
                  packed: bool | None = None) -> WeightLayout:
    """The layout for `config` on this backend. `packed`: True needs the packed kernel (UserError where it
    cannot run), False refuses it, None takes it where it can run (unsharded, f32, CPU, the kernel built)."""
    cpu = jax.default_backend() == "cpu"
    can = sharding is None and cpu and can_pack(config)
    if packed and not can:
      raise UserError("Sampler(packed=True) needs an unsharded f32 model on CPU and a C++ compiler here "
                      "(see the log for why the kernel is unavailable)")
    if can if packed is None else packed:
      return cls("packed")
    if not cpu:
      return cls("plain")
    return cls("loop" if sharding is None else "loop_per_call")

  @property
  def packed(self) -> bool:
    return self.kind == "packed"

  @property
  def matmul(self) -> Matmul:
    """The hook for `Transformer(..., matmul=...)`."""
    return PACKED if self.packed else XLA

  def store(self, params: Any) -> Any:
    """The params as the sampler keeps them (a copy, except for 'loop_per_call' and 'plain')."""
    if self.kind == "packed":
      return _store_packed(params)
    if self.kind == "loop":
      return _store_loop(params)
    return params

  # -- inside the jitted programs ------------------------------------------------------------------------
  def model_view(self, stored: Any) -> Any:
    """`store`'s params as the model (with `matmul`) reads them: prefill and prompt chunks."""
    return from_loop_layout(stored) if self.kind == "loop" else stored

  def loop_carry(self, stored: Any) -> Any:
    """The weights the decode loop carries: as stored, else put in the loop layout here, behind a barrier so
    XLA keeps the transposes outside the loop."""
    if self.kind in ("packed", "loop"):
      return stored
    return jax.lax.optimization_barrier(to_loop_layout(stored) if self.kind == "loop_per_call" else stored)

  def loop_view(self, carried: Any) -> Any:
    """`loop_carry`'s weights as the model reads them, inside the loop body."""
    return from_loop_layout(carried) if self.kind in ("loop", "loop_per_call") else carried

  def logits(self, hidden: jax.Array, params: Any, config: TransformerConfig) -> jax.Array:
    """hidden [B, D] (a few rows: decode) -> f32 logits [B, V] by the tied head of `params` (a model view).
    XLA's matmul computes it vocabulary-major (see `tied_logits`)."""
    return tied_logits(hidden, params["embedder"]["input_embedding"], config.final_logit_soft_cap, self.matmul,
                       vocab_major=not self.packed)
