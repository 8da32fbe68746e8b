"""Parameter trees: shapes without memory, logical axes, shardings, and sharded initialization."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.sharding import ShardingContext, logical_axes_of, tree_shardings
from gemma_jax.model.transformer import Transformer

Params = dict[str, Any]


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
