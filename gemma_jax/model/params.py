"""Parameter trees: shapes without memory, logical axes, shardings, and sharded initialization."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def count_params(tree: Params) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
