"""The jitted train and eval steps: one program over the mesh, explicit shardings, donated state.

Batches enter the step as a dict of arrays shaped `[A, R, T]`: A microbatches for gradient accumulation, each
the `[R, T]` rows a loss reads (for preference data R = 2B: every chosen row, then every rejected row), rows
sharded over the mesh's data and fsdp axes. Per-row arrays (e.g. DPO's `reference_logps`) are `[A, R]`.

`loss_fn(params, batch, aux) -> (loss, metrics)`: batch holds `[R, T]` arrays; aux is an extra input the loss
reads but does not differentiate (frozen reference params for DPO, or None).

`trainable` (a tree of bools like params, or None: all train; see `optim.trainable_mask`) marks the parameters
that train: gradients are taken for those only (no backward work for the frozen ones, which `grad_norm` leaves
out), and the optimizer state covers those only (`state.create(..., trainable)`).

A step whose loss or gradients are not finite leaves params and optimizer state untouched (the step and
data still advance) and counts itself in `nonfinite_run` / `nonfinite_total`; the loop decides when to stop.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma_jax.model.sharding import DEFAULT_RULES
from gemma_jax.training import state as state_lib
from gemma_jax.training.state import TrainState

LossFn = Callable[[Any, dict[str, jax.Array], Any], tuple[jax.Array, dict[str, jax.Array]]]
BATCH_AXES = dict(DEFAULT_RULES)["batch"]  # the mesh axes of the "batch" logical axis: rows over data x fsdp


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of `[A, R, ...]` batch arrays: rows over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def row_shards(mesh: Mesh) -> int:
  """How many ways the row axis is split: R must be a multiple of this."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def constrain_rows(mb: dict[str, jax.Array], mesh: Mesh | None) -> dict[str, jax.Array]:
  """Keeps a microbatch's [R, ...] rows sharded over data x fsdp inside the step."""
  if mesh is None:
    return mb
  return {k: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, P(BATCH_AXES))) for k, v in mb.items()}


def train_step(state: TrainState, batch: dict[str, jax.Array], aux: Any, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               mesh: Mesh | None = None, trainable: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over `A` microbatches (mean of their losses and gradients). Not jitted: see `jit_train_step`."""
  train_params = state_lib.trainable_part(state.params, trainable)
  frozen = state_lib.frozen_part(state.params, trainable)
  grad_fn = jax.value_and_grad(
      lambda p, mb: loss_fn(state_lib.merge(p, frozen, trainable), constrain_rows(mb, mesh), aux), has_aux=True)
  num_micro = jax.tree.leaves(batch)[0].shape[0]
  if num_micro == 1:
    (loss, metrics), grads = grad_fn(train_params, jax.tree.map(lambda x: x[0], batch))
  else:
    def body(acc, mb):
      (loss, metrics), grads = grad_fn(train_params, mb)
      return jax.tree.map(jnp.add, acc, grads), (loss, metrics)
    zeros = jax.tree.map(jnp.zeros_like, train_params)
    grads, (losses, metrics) = jax.lax.scan(body, zeros, batch)
    grads = jax.tree.map(lambda g: g / num_micro, grads)
    loss = jnp.mean(losses)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply(_):
    updates, new_opt = optimizer.update(grads, state.opt_state, train_params)
    return state_lib.merge(optax.apply_updates(train_params, updates), frozen, trainable), new_opt

  # A branch, not a select over the trees: the usual (finite) step makes no extra pass over params and moments.
  new_params, new_opt = jax.lax.cond(ok, apply, lambda _: (state.params, state.opt_state), None)
  applied = state.step - state.nonfinite_total  # updates done so far = the optimizer's count
  run = jnp.where(ok, 0, state.nonfinite_run + 1)
  new_state = state.replace(
      step=state.step + 1,
      params=new_params,
      opt_state=new_opt,
      rng=jax.random.key_data(jax.random.split(state.key)[0]),
      nonfinite_run=run.astype(jnp.int32),
      nonfinite_total=(state.nonfinite_total + (~ok)).astype(jnp.int32))
  out = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(applied),
         "nonfinite": (~ok).astype(jnp.int32), "nonfinite_run": new_state.nonfinite_run, **metrics}
  return new_state, out


def jit_train_step(*, loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                   mesh: Mesh, state_shardings: TrainState, aux_shardings: Any = None, donate: bool = True,
                   trainable: Any = None):
  """`step(state, batch, aux) -> (state, metrics)` jitted over the mesh; the state's buffers are donated."""
  replicated = NamedSharding(mesh, P())
  fn = lambda s, b, a: train_step(s, b, a, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule, mesh=mesh,
                                  trainable=trainable)
  return jax.jit(fn, in_shardings=(state_shardings, batch_sharding(mesh), aux_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,) if donate else ())


def eval_step(params: Any, batch: dict[str, jax.Array], aux: Any, *, loss_fn: LossFn, rows_per_example: int,
              sequential: bool = False) -> dict[str, jax.Array]:
  """Sums over the real examples of one `[1, R, T]` batch of their own loss and metrics, and their count.

  Each example (a pair: chosen row i and rejected row B + i; or one SFT row) is scored alone (vmapped), so a
  batch metric is exactly the mean of per-example metrics. An example whose first row is all padding (the
  rows filling a last partial batch) counts for nothing. Returns {"count": n, "loss": sum, <metric>: sum}.
  `loss_fn` should use a model without a sharding context (GSPMD places the vmapped examples).
  sequential: score the examples one after another (`lax.map`) instead: for models whose ops have no batching
  rule (Gemma 4's expert dispatch, `lax.ragged_dot`); the same numbers.
  """
  mb = jax.tree.map(lambda x: x[0], batch)
  k = rows_per_example
  examples = {n: jnp.swapaxes(x.reshape(k, x.shape[0] // k, *x.shape[1:]), 0, 1) for n, x in mb.items()}
  score = lambda ex: loss_fn(params, ex, aux)
  loss, metrics = jax.lax.map(score, examples) if sequential else jax.vmap(score)(examples)  # each [B]
  real = jnp.any(examples["input_mask"][:, 0].astype(bool), axis=-1)  # [B]
  out = {"loss": loss, **metrics}
  sums = {n: jnp.sum(jnp.where(real, v.astype(jnp.float32), 0.0)) for n, v in out.items()}
  return {"count": jnp.sum(real.astype(jnp.float32)), **sums}


def jit_eval_step(*, loss_fn: LossFn, mesh: Mesh, param_shardings: Any, aux_shardings: Any = None,
                  rows_per_example: int = 2, sequential: bool = False):
  """`eval(params, batch, aux) -> {"count", "loss", <metric>: sums over real examples}` jitted over the mesh."""
  replicated = NamedSharding(mesh, P())
  fn = lambda p, b, a: eval_step(p, b, a, loss_fn=loss_fn, rows_per_example=rows_per_example,
                                 sequential=sequential)
  return jax.jit(fn, in_shardings=(param_shardings, batch_sharding(mesh), aux_shardings),
                 out_shardings=replicated)
