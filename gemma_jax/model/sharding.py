"""Logical sharding axes and the one table that maps them onto a device mesh.

Parameters and the main activations name their dimensions with logical axes ("vocab", "embed", "heads",
...). `DEFAULT_RULES` maps each logical axis to mesh axes ("data", "fsdp", "tensor"). A mesh axis that does
not divide a dimension is dropped for that array (e.g. one kv head is replicated, not split), so every
preset runs on every mesh shape.

Mesh specs read like `fsdp:4,tensor:2`; axes left out have size 1, and "-1" takes the remaining devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (tried in order; all that divide the dimension are used)
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("expert", ("tensor",)),  # Gemma 4's experts (their own MLP dim stays whole)
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("norm", ()),
    ("length", ()),
    ("cache_length", ()),
    ("act_embed", ()),
)


def param_init(init, axes: Sequence[str | None]):
  """Wraps an initializer so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def parse_mesh_spec(spec: str, num_devices: int | None = None) -> dict[str, int]:
  """'fsdp:4,tensor:2' -> {'data': 1, 'fsdp': 4, 'tensor': 2}; one axis may be -1 (the rest)."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = {a: 1 for a in MESH_AXES}
  free = None
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = part.partition(":")
    if name not in MESH_AXES or not size.lstrip("-").isdigit():
      raise ConfigError(f"mesh spec {spec!r}: bad entry {part!r}; write e.g. 'data:2,fsdp:4,tensor:1' "
                        f"with axes from {', '.join(MESH_AXES)}")
    sizes[name] = int(size)
    if sizes[name] == -1:
      if free is not None:
        raise ConfigError(f"mesh spec {spec!r}: only one axis may be -1")
      free = name
    elif sizes[name] <= 0:
      raise ConfigError(f"mesh spec {spec!r}: axis {name} must be a positive size or -1")
  if free is not None:
    rest = math.prod(v for k, v in sizes.items() if k != free)
    if num_devices % rest:
      raise ConfigError(f"mesh spec {spec!r}: {num_devices} devices do not split over the fixed axes ({rest})")
    sizes[free] = num_devices // rest
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh spec {spec!r} covers {math.prod(sizes.values())} devices but {num_devices} are "
                      f"present; make the product of the sizes equal {num_devices} or use -1 for one axis")
  return sizes


def make_mesh(spec: str = "fsdp:-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # non-TPU or irregular topologies: plain order is fine
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class ShardingContext:
  """A mesh plus the logical-axis rules; hashable, so modules can hold it as a static field."""

  mesh: Mesh
  rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

  def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> P:
    """PartitionSpec for an array of `shape` whose dims are named `logical_axes`."""
    rules = dict(self.rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical_axes, shape):
      chosen = []
      for mesh_axis in rules.get(name, ()) if name else ():
        size = self.mesh.shape[mesh_axis]
        if mesh_axis in used or size == 1:
          continue
        if dim % (math.prod(self.mesh.shape[a] for a in chosen) * size) == 0:
          chosen.append(mesh_axis)
      used.update(chosen)
      out.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*out)

  def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes, shape))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def constrain(x: jax.Array, logical_axes: Sequence[str | None], ctx: ShardingContext | None) -> jax.Array:
  """Sharding constraint on an activation; a no-op without a sharding context."""
  if ctx is None:
    return x
  return jax.lax.with_sharding_constraint(x, ctx.sharding(logical_axes, x.shape))


def logical_axes_of(boxed_tree: Any) -> Any:
  """Tree of logical-axis tuples from a tree of `nn.LogicallyPartitioned` (e.g. `jax.eval_shape(init)`)."""
  return jax.tree.map(lambda b: tuple(b.names) if isinstance(b, nn.LogicallyPartitioned) else (None,) * b.ndim,
                      boxed_tree, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))


def tree_shardings(ctx: ShardingContext, axes_tree: Any, shapes_tree: Any) -> Any:
  """NamedShardings for a tree, from matching trees of logical axes and of arrays/ShapeDtypeStructs."""
  return jax.tree.map(lambda axes, s: ctx.sharding(axes, s.shape), axes_tree, shapes_tree,
                      is_leaf=lambda a: isinstance(a, tuple))
