"""Multi-host start-up: `jax.distributed.initialize` from explicit flags or the usual environment.

Every process of a multi-host run calls `initialize` once, before touching any device. Explicit arguments
win; otherwise the standard variables are read (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), and otherwise JAX's own cluster detection runs where it applies (Cloud TPU pods, SLURM,
Open MPI). A single process with none of these does nothing.
"""

from __future__ import annotations

import os

import jax

from gemma_jax.errors import ConfigError

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
  """Joins the run's processes; returns True when a multi-process run was set up.

  coordinator_address: "host:port" of process 0. num_processes, process_id: this run's size and this
  process's rank. Unset (None, "", or < 0 for process_id) values fall back to the environment.
  """
  global _initialized
  if _initialized:
    return jax.process_count() > 1
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if not num_processes:
    num_processes = int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None
  if process_id is None or process_id < 0:
    process_id = int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None

  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if explicit:
    missing = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
      raise ConfigError(f"multi-host start: {', '.join(missing)} not given; pass all of --coordinator_address, "
                        "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                        "JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if num_processes == 1:
      _initialized = True
      return False
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
  elif any(k in env for k in _CLUSTER_ENV):
    _cpu_collectives()
    jax.distributed.initialize()  # JAX's cluster auto-detection
  else:
    _initialized = True
    return False
  _initialized = True
  return jax.process_count() > 1


def _cpu_collectives() -> None:
  """CPU processes talk through gloo (needed for the local multi-process tests; harmless on GPU/TPU)."""
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # an older or newer jax without this option
    pass
