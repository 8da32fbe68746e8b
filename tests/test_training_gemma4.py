"""Gemma 4 through the training loop, on tiny models of its three kinds: dense (global layers with their own
head dim, keys = values), edge (per-layer inputs, a KV-shared layer with a double-wide MLP) and MoE. Each
kind trains with an objective the others do not (SFT, DPO, SimPO; ORPO is checked against TRL at the loss
level), sharded over the simulated devices, on the gemma4 template, with LoRA on one; the MoE run resumes
bitwise."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from helpers import assert_trees_bitwise_equal, tiny_config
from training_helpers import read_metrics, run_config, write_pairs, write_tiny_checkpoint
from gemma_jax import checkpoint
from gemma_jax.training.loop import train

pytestmark = pytest.mark.slow  # whole runs end to end: `bash scripts/test.sh --slow`

KINDS = {
    "dense": dict(per_layer_input_dim=0, num_kv_shared_layers=0, double_wide_shared_mlp=False),
    "edge": dict(),  # tiny_config("gemma4") has every edge feature on
    "moe": dict(per_layer_input_dim=0, num_kv_shared_layers=0, double_wide_shared_mlp=False, num_experts=4,
                experts_per_token=2, expert_hidden_dim=16),
}


def _sft(path: str, n: int) -> str:
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"messages": [{"role": "user", "content": f"one two {i % 7}"},
                                       {"role": "assistant", "content": "the capital of france is paris ."}]}) + "\n")
  return path


@pytest.fixture(scope="module")
def ws4(tmp_path_factory, tiny_tokenizer_v4):
  tmp = tmp_path_factory.mktemp("gemma4")
  out = {"train": write_pairs(str(tmp / "train.jsonl"), 24, 0), "eval": write_pairs(str(tmp / "eval.jsonl"), 8, 1),
         "sft": _sft(str(tmp / "sft.jsonl"), 24)}
  for kind, over in KINDS.items():
    config = tiny_config("gemma4", vocab_size=tiny_tokenizer_v4.vocab_size, **over)
    out[kind] = write_tiny_checkpoint(str(tmp / kind), tiny_tokenizer_v4, config=config)
  return out


def _config(ws4, kind: str, **over):
  ws = {"init": ws4[kind], "train": ws4["train"], "eval": ws4["eval"]}
  return run_config(ws, **{"data.template": "gemma4", "num_steps": 2, "eval.every": 2, "optim.warmup": 0.0, **over})


@pytest.mark.parametrize("kind,objective,extra", [
    ("dense", "dpo", {}), ("edge", "sft", {"batch_size": 8}), ("moe", "simpo", {}),
    ("edge", "orpo", {"lora.rank": 2, "lora.alpha": 4.0})])
def test_each_kind_trains(ws4, tmp_path, kind, objective, extra):
  over = {"objective": objective, **extra}
  if objective == "sft":
    over["data.train"], over["data.eval"] = ws4["sft"], ""
  result = train(_config(ws4, kind, **over), str(tmp_path / "run"))
  rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  assert rows[0]["loss"] != rows[1]["loss"]
  final = checkpoint.load(result.final_dir)
  assert final.config.family == "gemma4" and final.template["name"] == "gemma4" and final.kind == "it"
  if objective == "dpo":
    assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-5)  # policy == reference at the start


def test_moe_run_resumes_bitwise(ws4, tmp_path):
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  over = {"data.eval": "", "checkpoint.every": 2, "optim.schedule": "constant"}  # the same rates for 2 and 4 steps
  train(_config(ws4, "moe", num_steps=4, **over), whole)
  train(_config(ws4, "moe", num_steps=2, **over), parts)
  shutil.rmtree(os.path.join(parts, "final"))
  train(_config(ws4, "moe", num_steps=4, **over), parts)
  a, b = (checkpoint.load(os.path.join(d, "final")) for d in (whole, parts))
  assert_trees_bitwise_equal(a.params, b.params)
