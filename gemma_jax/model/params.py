"""Parameter trees: shapes without memory, logical axes, shardings, and sharded initialization."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.model import lora
from gemma_jax.model.attention import K_EQN, KV_EQN, OUT_EQN, Q_EQN, QKV_EQN
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.sharding import ShardingContext, logical_axes_of, tree_shardings
from gemma_jax.model.transformer import GATING_EQN, LINEAR_EQN, PLE_GATE_EQN, PLE_MODEL_EQN, PLE_OUT_EQN, Transformer

Params = dict[str, Any]
# The einsum each matmul weight enters, by its name (the module's for `.../w`, else the leaf's).
MATMUL_EQNS = {"q_einsum": Q_EQN, "kv_einsum": KV_EQN, "qkv_einsum": QKV_EQN, "k_einsum": K_EQN,
               "attn_vec_einsum": OUT_EQN, "gating_einsum": GATING_EQN, "linear": LINEAR_EQN,
               "per_layer_model_projection": PLE_MODEL_EQN, "per_layer_input_gate": PLE_GATE_EQN,
               "per_layer_projection": PLE_OUT_EQN}


def _boxed_init(config: TransformerConfig):
  model = Transformer(config)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return lambda rng: model.init(rng, tokens)["params"]


def make_init(config: TransformerConfig):
  """`rng -> params` (plain arrays), to jit with `out_shardings` (see `init_params`)."""
  boxed = _boxed_init(config)
  return lambda rng: nn.meta.unbox(boxed(rng))


def _boxed_shapes(config: TransformerConfig) -> Params:
  return jax.eval_shape(_boxed_init(config), jax.random.key(0))


def param_shapes(config: TransformerConfig) -> Params:
  """Tree of ShapeDtypeStructs (no memory is touched; works for every preset)."""
  return nn.meta.unbox(_boxed_shapes(config))


def param_axes(config: TransformerConfig) -> Params:
  """Tree of logical-axis tuples, one per parameter."""
  return logical_axes_of(_boxed_shapes(config))


def param_shardings(config: TransformerConfig, ctx: ShardingContext) -> Params:
  """Tree of NamedShardings placing each parameter on the mesh by the rules table."""
  return tree_shardings(ctx, param_axes(config), param_shapes(config))


def init_params(config: TransformerConfig, rng: jax.Array, sharding: ShardingContext | None = None) -> Params:
  """Random parameters; with a sharding context each device builds only its shard (no host copy)."""
  init = make_init(config)
  if sharding is None:
    return jax.jit(init)(rng)
  return jax.jit(init, out_shardings=param_shardings(config, sharding))(rng)


def init_adapters(config: TransformerConfig, rng: jax.Array, sharding: ShardingContext | None = None) -> Params:
  """Fresh adapters of `config` (`lora_rank > 0`) alone: peft's init, b = 0. Under jit only the adapters' init
  runs (the base's is dead code), placed by the rules like their weights."""
  init = lambda key: lora.split(make_init(config)(key))[1]
  if sharding is None:
    return jax.jit(init)(rng)
  return jax.jit(init, out_shardings=lora.split(param_shardings(config, sharding))[1])(rng)


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
  """{'layer_0': {'attn': {'q_einsum': {'w': x}}}} -> {'layer_0/attn/q_einsum/w': x}."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, key))
    else:
      out[key] = v
  return out


@functools.lru_cache(maxsize=16)
def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of every parameter `config` needs."""
  return {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}


def compare_to_config(config: TransformerConfig, flat: dict[str, Any]
                      ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
  """(missing names, extra names, [(name, got shape, wanted shape)]) of a flat tree against `config`."""
  want = expected_shapes(config)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  wrong = [(k, tuple(np.shape(flat[k])), shape) for k, shape in want.items()
           if k in flat and tuple(np.shape(flat[k])) != shape]
  return missing, extra, wrong


def count_params(tree: Params) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def fold_adapters(config: TransformerConfig, params: Params, weight: float = 1.0) -> tuple[TransformerConfig, Params]:
  """(config without adapters, params with every adapter folded into its weight): W[slot] + weight * scale * a b.

  `params` hold adapters (`config.lora_rank > 0`); weight 1 is the adapted model, 0 the base, in between a
  partial merge. The folded weights keep their dtype (the sum is computed in f32).
  """
  factor = weight * lora.scale(config.lora_alpha, config.lora_rank, config.lora_rslora)

  def walk(tree: Params) -> Params:
    out = {}
    for k, v in tree.items():
      if lora.is_adapter_name(k):
        continue
      if not isinstance(v, dict):
        out[k] = _fold_leaf(k, v, tree, factor)
      elif "w" in v and k in lora.SLOTS:  # an attention Einsum: {w, lora_*}
        out[k] = {**walk(v), "w": _fold_leaf(k, v["w"], v, factor)}
      else:
        out[k] = walk(v)
    return out

  return config.replace(lora_rank=0), walk(params)


def _fold_leaf(name: str, w, siblings: Params, factor: float):
  slots = lora.SLOTS.get(name, ())
  adapters = {i: (siblings[lora.leaf_name(s, "a")], siblings[lora.leaf_name(s, "b")]) for i, s in enumerate(slots)
              if lora.leaf_name(s, "a") in siblings}
  return lora.fold(MATMUL_EQNS[name], w, adapters, factor) if adapters else w
