"""Trains a Gemma model with ORPO, SFT, DPO or SimPO as a run config says.

    python -m train.train --config=configs/orpo_gemma3_270m_cpu.py --workdir=/tmp/run \
        --config.data.train=prefs.jsonl --config.num_steps=50

Any config field can be overridden with `--config.<field>=value`. Running the same command again on the same
work directory resumes from the latest run checkpoint. Multi-host: start one process per host with
`--coordinator_address=host0:1234 --num_processes=N --process_id=i` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; TPU pods and SLURM are detected). The trained model lands in
`<workdir>/final` (our checkpoint format): `python -m sample.sample --ckpt=<workdir>/final`. Progress,
metrics and warnings go to the console; library logs (orbax, jax) to `<workdir>/log.txt` (`log.<i>.txt` on
process i > 0) once the run holds its work directory; `--verbosity=1` shows them on the console too.
"""

from __future__ import annotations

import os

from absl import app, flags

from gemma_jax import cli

_CONFIG = cli.define_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "orpo_gemma3_270m_cpu.py"),
    "Run config file (configs/<recipe>.py[:arg]); override fields with --config.<field>=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the final model.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from gemma_jax import console
  console.setup(None)  # the log file waits for the work directory (see _log_to_workdir)
  from gemma_jax.errors import run_main
  run_main(_run)


def _run():
  from gemma_jax.training import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  import jax
  import gemma_jax
  from gemma_jax.training.loop import train
  _log_to_workdir(_WORKDIR.value, jax.process_index())
  if jax.process_index() == 0:
    print(f"gemma_jax {gemma_jax.__version__}, jax {jax.__version__}; {jax.process_count()} process(es), "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)
  result = train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    if result.stopped_by_signal:
      print(f"stopped at step {result.step}; resume with the same command", flush=True)
    else:
      print(f"done: step {result.step}; model saved to {result.final_dir}", flush=True)


def _log_to_workdir(workdir: str, process: int) -> None:
  """Library logs to <workdir>/log.txt, appended, from the moment this run holds the work directory (it wrote
  config.json, and on process 0 the lock names it): a refused run leaves no file in someone else's run."""
  import json
  import time
  from gemma_jax import console
  from gemma_jax.training.workdir import CONFIG_FILE, LOCK_FILE
  config_written = console.written_since(os.path.join(workdir, CONFIG_FILE), time.time())

  def holds_workdir() -> bool:
    if not config_written():
      return False
    if process:
      return True
    try:
      with open(os.path.join(workdir, LOCK_FILE)) as f:
        return json.load(f).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
      return False

  console.setup(os.path.join(workdir, "log.txt" if process == 0 else f"log.{process}.txt"), ready=holds_workdir,
                mode="a")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
