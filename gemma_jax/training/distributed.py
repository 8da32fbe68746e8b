"""Multi-host start-up: `jax.distributed.initialize` from explicit flags or the usual environment.

Every process of a multi-host run calls `initialize` once, before touching any device. Explicit arguments
win; otherwise the standard variables are read (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), and otherwise JAX's own cluster detection runs where it applies (Cloud TPU pods, SLURM,
Open MPI). A single process with none of these does nothing.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax

from gemma_jax.errors import ConfigError

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_initialized = False
DEFAULT_TIMEOUT_S = 300


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from None


def _wait_for_coordinator(address: str, process_id: int, num_processes: int, timeout_s: int) -> None:
  """Waits until process 0's coordinator accepts connections (ConfigError after `timeout_s`).

  jax's own client aborts the whole process with a C++ stack trace when it cannot register in time, so an
  unreachable coordinator is found here first, where it can still be one clear line.
  """
  host, _, port = address.rpartition(":")
  try:
    port_number = int(port)
  except ValueError:
    raise ConfigError(f"coordinator_address={address!r}: the port {port!r} is not a number") from None
  print(f"process {process_id}/{num_processes}: waiting for the coordinator at {address} (up to {timeout_s} s)",
        file=sys.stderr, flush=True)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host.strip("[]"), port_number), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConfigError(f"process {process_id} of {num_processes}: the coordinator at {address} did not answer "
                          f"within {timeout_s} s ({e.strerror or e}); start process 0 first, check the address "
                          "and port, or raise GEMMA_JAX_INIT_TIMEOUT") from None
      time.sleep(0.5)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else type(e).__name__


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               timeout_s: int | None = None) -> bool:
  """Joins the run's processes; returns True when a multi-process run was set up.

  coordinator_address: "host:port" of process 0. num_processes, process_id: this run's size and this
  process's rank. Unset (None, "", or < 0 for process_id) values fall back to the environment.
  timeout_s: how long to wait for all processes (default $GEMMA_JAX_INIT_TIMEOUT, else 300 s).
  """
  global _initialized
  if _initialized:
    return jax.process_count() > 1
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if not num_processes:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None or process_id < 0:
    process_id = _env_int("JAX_PROCESS_ID")
  if timeout_s is None:
    timeout_s = _env_int("GEMMA_JAX_INIT_TIMEOUT") or DEFAULT_TIMEOUT_S

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
    if ":" not in coordinator_address:
      raise ConfigError(f"coordinator_address={coordinator_address!r}: expected host:port")
    _cpu_collectives()
    if process_id != 0:
      _wait_for_coordinator(coordinator_address, process_id, num_processes, timeout_s)
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id, local_device_ids=local_device_ids,
                                 initialization_timeout=timeout_s)
    except Exception as e:  # jax raises XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...) with a long text
      raise ConfigError(f"process {process_id} of {num_processes}: could not join the run through the "
                        f"coordinator at {coordinator_address} within {timeout_s} s ({_first_line(e)}); check that "
                        "process 0 is running and that the address and port are reachable from here") from None
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
