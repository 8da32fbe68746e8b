"""The train state: one pytree holding everything a step reads and writes, so it saves and restores whole.

    step              int32 []   optimizer steps taken (skipped non-finite steps included: data moved on)
    params            tree       the master weights (param_dtype, usually f32)
    opt_state         tree       optax state over the trainable params (moments mirror them and their shardings;
                                 counts replicated)
    rng               uint32 [2] raw key data (`jax.random.key_data`), so orbax saves it as a plain array
    nonfinite_run     int32 []   non-finite steps in a row (reset by a finite one)
    nonfinite_total   int32 []   non-finite steps in all

Frozen parameters (a `trainable` mask, see `optim.trainable_mask`) stay in `params` but the optimizer never sees
them: `trainable_part` is the tree with None where a leaf is frozen (optax treats None as an empty subtree), and
`merge` puts the two parts back together.

The data-iterator state is host-side (a JSON dict) and is saved beside this pytree (see `checkpointing`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Params
  opt_state: Any
  rng: jax.Array
  nonfinite_run: jax.Array
  nonfinite_total: jax.Array

  @property
  def key(self) -> jax.Array:
    """The typed PRNG key of this step."""
    return jax.random.wrap_key_data(self.rng)


def trainable_part(tree: Any, trainable: Any | None) -> Any:
  """`tree` (params or a tree like them) with None at the frozen leaves; `tree` itself when all train."""
  if trainable is None:
    return tree
  return jax.tree.map(lambda x, t: x if t else None, tree, trainable)


def frozen_part(tree: Any, trainable: Any | None) -> Any:
  """`tree` with None at the trainable leaves (None when all train)."""
  if trainable is None:
    return None
  return jax.tree.map(lambda x, t: None if t else x, tree, trainable)


def merge(train: Any, frozen: Any, trainable: Any | None) -> Any:
  """The whole tree again from `trainable_part` and `frozen_part`."""
  if trainable is None:
    return train
  return jax.tree.map(lambda t, a, b: a if t else b, trainable, train, frozen, is_leaf=lambda x: x is None)


def create(params: Params, optimizer: optax.GradientTransformation, seed: int,
           trainable: Any | None = None) -> TrainState:
  """A fresh state at step 0 (call under jit to place it, see `state_shardings`)."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=optimizer.init(trainable_part(params, trainable)),
                    rng=jax.random.key_data(jax.random.key(seed)), nonfinite_run=zero, nonfinite_total=zero)


def state_shardings(optimizer: optax.GradientTransformation, params_shapes: Params, param_shardings: Params,
                    mesh: jax.sharding.Mesh, trainable: Any | None = None) -> TrainState:
  """A TrainState of NamedShardings: params and their optimizer moments by the rules, the rest replicated."""
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(optimizer.init, trainable_part(params_shapes, trainable))
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, trainable_part(param_shardings, trainable),
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
                    nonfinite_run=replicated, nonfinite_total=replicated)


def abstract_state(optimizer: optax.GradientTransformation, params_shapes: Params,
                   shardings: TrainState, trainable: Any | None = None) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the state: the target orbax restores into."""
  shapes = jax.eval_shape(lambda p: create(p, optimizer, 0, trainable), params_shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
