"""LoRA through the training loop on a tiny model: only the adapters train (the base is bitwise the same), the
final model is an adapter checkpoint that names its base, resume is bitwise, DPO's reference is the base."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import assert_trees_bitwise_equal
from training_helpers import make_workspace, read_metrics, run_config
from gemma_jax import checkpoint
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model import lora
from gemma_jax.model.params import flatten
from gemma_jax.training.loop import train

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "data.eval": "", "checkpoint.every": 2}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_tokenizer):
  return make_workspace(tmp_path_factory.mktemp("ws"), tiny_tokenizer)


def _run_checkpoint_arrays(workdir: str, step: int) -> set[str]:
  """The paths of the arrays a run checkpoint holds (frozen leaves are recorded as None: nothing stored)."""
  with open(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA")) as f:
    tree = json.load(f)["tree_metadata"]
  return {k for k, v in tree.items() if v["value_metadata"]["value_type"] != "None"}


@pytest.mark.slow  # whole runs end to end: `bash scripts/test.sh --slow`
def test_adapters_train_alone_and_final_is_an_adapter_checkpoint(ws, tmp_path):
  workdir = str(tmp_path / "run")
  # With an evaluation at step 2: its greedy samples run the adapted model (a sampler refuses adapters its
  # config would ignore).
  result = train(run_config(ws, num_steps=2, **{**LORA, "data.eval": ws["eval"], "eval.every": 2}), workdir)
  init, final = checkpoint.load(ws["init"]), checkpoint.load(result.final_dir)
  base, adapters = lora.split(final.params)
  assert_trees_bitwise_equal(base, init.params)  # the base got no update
  assert final.config.lora_rank == 4 and final.config.lora_alpha == 8.0
  b = flatten(adapters)
  assert set(k.rsplit("/", 1)[-1] for k in b) == {lora.leaf_name(s, w) for s in lora.PROJECTIONS for w in "ab"}
  assert all(np.any(v != 0) for k, v in b.items() if k.endswith("_b"))  # b moved off zero
  meta = checkpoint.read_metadata(result.final_dir)
  assert meta["base"]["path"] == os.path.abspath(ws["init"])
  assert all(lora.is_adapter_name(k.rsplit("/", 1)[-1]) for k in meta["tensors"])  # adapters alone
  # Run checkpoints hold the adapters and their moments, not the base.
  arrays = _run_checkpoint_arrays(workdir, 2)
  assert any("lora_q_b" in k for k in arrays) and not any("input_embedding" in k for k in arrays)
  assert not any(k.endswith("'w')") for k in arrays)
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert rows[1]["loss"] != rows[0]["loss"]


@pytest.mark.slow  # whole runs end to end: `bash scripts/test.sh --slow`
def test_resume_is_bitwise_and_another_rank_is_refused(ws, tmp_path):
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  over = {**LORA, "optim.schedule": "constant"}  # the same rates for a 2- and a 4-step run
  train(run_config(ws, num_steps=4, **over), whole)
  train(run_config(ws, num_steps=2, **over), parts)
  shutil.rmtree(os.path.join(parts, "final"))
  train(run_config(ws, num_steps=4, **over), parts)
  a, b = (checkpoint.load(os.path.join(d, "final")) for d in (whole, parts))
  assert_trees_bitwise_equal(a.params, b.params)
  with pytest.raises(ConfigError, match="lora_rank: 4 saved, 8 now"):
    train(run_config(ws, num_steps=6, **{**over, "lora.rank": 8}), parts)


@pytest.mark.slow  # whole runs end to end: `bash scripts/test.sh --slow`
def test_a_moved_or_different_base_is_named(ws, tmp_path, tiny_tokenizer):
  from training_helpers import write_tiny_checkpoint
  base = str(tmp_path / "base")
  shutil.copytree(ws["init"], base)
  result = train(run_config(ws, num_steps=1, init_from=base, **LORA), str(tmp_path / "run"))
  moved = str(tmp_path / "moved")
  os.rename(base, moved)
  with pytest.raises(CheckpointError, match="which is not there; pass its new location"):
    checkpoint.load(result.final_dir)
  assert checkpoint.load(result.final_dir, base=moved).config.lora_rank == 4
  other = write_tiny_checkpoint(str(tmp_path / "other"), tiny_tokenizer, seed=1)
  with pytest.raises(CheckpointError, match="trained on another base"):
    checkpoint.load(result.final_dir, base=other)


@pytest.mark.slow  # whole runs end to end: `bash scripts/test.sh --slow`
def test_dpo_reference_is_the_base_without_a_copy(ws, tmp_path):
  """DPO with adapters: the first loss is ln 2 (policy == reference: b = 0), then the policy moves."""
  train(run_config(ws, objective="dpo", num_steps=2, **LORA), str(tmp_path / "run"))
  rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
  assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
  assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the same model twice (f32 rounding)
  assert rows[1]["rewards/margins"] != 0.0


def test_lora_config_errors_are_one_line(ws, tmp_path):
  with pytest.raises(ConfigError, match=r"lora_targets: 'qq' names no projection"):
    train(run_config(ws, **{**LORA, "lora.targets": "qq"}), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match=r"optim.freeze.*must be empty with lora.rank > 0"):
    train(run_config(ws, **{**LORA, "optim.freeze": "embedder"}), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match=r"set --config.lora.rank instead"):
    train(run_config(ws, **{"model_overrides.lora_rank": 2}), str(tmp_path / "c"))


@pytest.mark.slow  # whole runs end to end: `bash scripts/test.sh --slow`
def test_sampling_adapters_unmerged_equals_the_merged_model(ws, tmp_path):
  """The sampler applies the adapters itself (packed CPU kernel and XLA layouts): the same greedy tokens as the
  merged full model; adapter sets over one base sample side by side; b = 0 samples the base."""
  from gemma_jax.convert.run import convert
  from gemma_jax.model.params import fold_adapters
  from gemma_jax.sampling.engine import Sampler
  from gemma_jax.sampling.loading import load_sampler
  result = train(run_config(ws, num_steps=1, **LORA), str(tmp_path / "run"))
  merged = str(tmp_path / "merged")
  convert(src=result.final_dir, dst=merged, merge=True)
  prompts = ["the capital of", "hello world how"]
  tokens = lambda s: [c.tokens for c in s.generate(prompts, max_new_tokens=8)]
  logprobs = lambda s: np.array([c.logprobs for c in s.generate(prompts, max_new_tokens=8)])
  ck, adapted = load_sampler(result.final_dir)  # the adapter checkpoint, on its base
  assert tokens(adapted) == tokens(load_sampler(merged)[1])
  base, adapters = lora.split(ck.params)
  # (The tiny random model's tied head picks the last token again whatever comes after: a smaller table spreads
  # its log-probs, so that what the adapters change shows.)
  base = {**base, "embedder": {"input_embedding": base["embedder"]["input_embedding"] * 0.05}}
  keys = iter(jax.random.split(jax.random.key(7), 100))
  strong = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(next(keys), x.shape), adapters)  # far from 0
  folded_config, folded = fold_adapters(ck.config, lora.attach(base, strong))
  base_config = checkpoint.load(ws["init"]).config
  for packed in (None, False):
    with_adapters = logprobs(Sampler(ck.config, lora.attach(base, strong), ck.tokenizer, packed=packed))
    np.testing.assert_allclose(with_adapters, logprobs(Sampler(folded_config, folded, ck.tokenizer, packed=packed)),
                               atol=1e-4)
    plain = logprobs(Sampler(base_config, base, ck.tokenizer, packed=packed))
    assert np.abs(with_adapters - plain).max() > 0.1
    off = lora.scale_b(lora.attach(base, strong), 0.0)
    np.testing.assert_array_equal(logprobs(Sampler(ck.config, off, ck.tokenizer, packed=packed)), plain)


def test_a_sampler_refuses_adapters_its_config_would_ignore(ws):
  from helpers import tiny_config
  from gemma_jax.model.params import init_params
  from gemma_jax.sampling.engine import Sampler
  config = tiny_config("gemma3", num_layers=2, lora_rank=2)
  params = init_params(config, jax.random.key(0))
  tok = checkpoint.load(ws["init"]).tokenizer
  with pytest.raises(ValueError, match="carry LoRA adapters but the config has lora_rank=0"):
    Sampler(config.replace(lora_rank=0), params, tok)
