"""Shared by the training-loop tests: a tiny model checkpoint, a tiny preference dataset, a run config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the capital of france is paris . a model answers questions about cities , rivers and numbers "
         "hello world how are you today ? fine thanks ! one two three four five six seven eight nine ten").split()


def write_tiny_checkpoint(path: str, tokenizer, *, seed: int = 0, config=None) -> str:
  """A random tiny Gemma 3 (2 layers, the tokenizer's 300-piece vocabulary) in our checkpoint format, kind PT;
  or `config`'s model."""
  from helpers import tiny_config
  from gemma_jax import checkpoint
  from gemma_jax.model import init_params
  config = config or tiny_config("gemma3", num_layers=2, vocab_size=tokenizer.vocab_size, embed_dim=32,
                                 hidden_dim=64, head_dim=8, query_pre_attn_scalar=8)
  params = jax.device_get(init_params(config, jax.random.key(seed)))
  checkpoint.save(path, config=config, params=params, tokenizer=tokenizer, template=None, kind="pt",
                  provenance={"test": "tiny random model"})
  return path


def write_pairs(path: str, n: int, seed: int = 0) -> str:
  """n preference records {"prompt", "chosen", "rejected"} of a few words each (JSONL)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  words = lambda k: " ".join(rng.choice(WORDS, k))
  with open(path, "w") as f:
    for _ in range(n):
      f.write(json.dumps({"prompt": words(rng.integers(2, 6)), "chosen": words(rng.integers(1, 6)),
                          "rejected": words(rng.integers(1, 6))}) + "\n")
  return path


def make_workspace(tmp_path, tokenizer, *, n_train: int = 48, n_eval: int = 8) -> dict[str, str]:
  ckpt = write_tiny_checkpoint(str(tmp_path / "init"), tokenizer)
  return {"init": ckpt, "train": write_pairs(str(tmp_path / "train.jsonl"), n_train, 0),
          "eval": write_pairs(str(tmp_path / "eval.jsonl"), n_eval, 1)}


OVERRIDES = {
    "objective": "orpo", "data.template": "gemma3", "data.max_length": 96, "batch_size": 4, "num_steps": 6,
    "optim.lr": 1e-2, "optim.warmup": 0.2, "optim.weight_decay": 0.01, "checkpoint.every": 2,
    "checkpoint.keep": 10, "eval.every": 3, "eval.num_samples": 1, "eval.sample_tokens": 4, "log_every": 1,
    "progress": False, "mesh": "fsdp:-1",
}


def run_config(ws: dict[str, str], **overrides):
  from gemma_jax.training.run_config import default_config
  c = default_config()
  for k, v in {**OVERRIDES, "init_from": ws["init"], "data.train": ws["train"], "data.eval": ws["eval"],
               **overrides}.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def cli_args(ws: dict[str, str], workdir: str, **overrides) -> list[str]:
  """`python -m train.train` arguments for the same run as `run_config(ws, **overrides)`."""
  args = [sys.executable, "-m", "train.train", f"--workdir={workdir}"]
  for k, v in {**OVERRIDES, "init_from": ws["init"], "data.train": ws["train"], "data.eval": ws["eval"],
               **overrides}.items():
    args.append(f"--config.{k}={v}")
  return args


def subprocess_env(devices: int, cache_dir: str | None = None) -> dict[str, str]:
  """Environment of a CPU training subprocess with `devices` simulated devices.

  cache_dir: a persistent compilation cache shared by the subprocesses of one test (the same executables are
  reused, so results stay bitwise identical, and each restart skips compiling).
  """
  env = dict(os.environ)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def run(args: list[str], devices: int, timeout: float, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(args, env=subprocess_env(devices), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, **kw)
