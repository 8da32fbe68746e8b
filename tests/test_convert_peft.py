"""HF peft adapters in and out: a peft directory (made by peft itself, `tools/make_trl_fixtures.py`) imported
onto its converted base gives peft's logits; exported back it is peft's files tensor for tensor; merged, the
full model computes the adapted one. No torch here."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import checkpoint
from gemma_jax.convert.peft import CONFIG_FILE, WEIGHTS_FILE, read_peft
from gemma_jax.convert.run import convert
from gemma_jax.convert.safetensors_io import SafetensorsFile
from gemma_jax.errors import CheckpointError, UserError
from gemma_jax.model import lora
from gemma_jax.model.transformer import Transformer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "trl", "gemma3_lora")
TOKENS = np.array([[2] + list(range(4, 40))], np.int32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(our base checkpoint, our adapter checkpoint imported from peft's directory)."""
  tmp = tmp_path_factory.mktemp("peft")
  base, adapters = str(tmp / "base"), str(tmp / "adapters")
  convert(src=FIXTURE, dst=base)
  convert(src=os.path.join(FIXTURE, "adapter"), dst=adapters, base=base)
  return base, adapters


def _logits(ck) -> np.ndarray:
  logits, _ = Transformer(ck.config).apply({"params": ck.params}, jnp.asarray(TOKENS))
  return np.asarray(logits)


def test_a_peft_adapter_gives_peft_logits(converted):
  ck = checkpoint.load(converted[1])
  assert ck.config.lora_rank == 4 and ck.config.lora_alpha == 12.0 and ck.config.lora_targets == "q,k,v,o,gate,up,down"
  ref = np.load(os.path.join(FIXTURE, "reference.npz"))["logits"]
  np.testing.assert_allclose(_logits(ck), ref, atol=1e-4, rtol=0)
  base = checkpoint.load(converted[0])
  assert np.abs(_logits(base) - ref).max() > 1e-2  # the adapters matter here


def test_exported_adapters_are_peft_files_tensor_for_tensor(converted, tmp_path):
  out = str(tmp_path / "peft")
  convert(src=converted[1], dst=out, dst_format="peft")
  ours, theirs = (SafetensorsFile(os.path.join(d, WEIGHTS_FILE)) for d in (out, os.path.join(FIXTURE, "adapter")))
  assert ours.shapes() == theirs.shapes()
  for name in theirs.shapes():
    np.testing.assert_array_equal(ours.get(name), theirs.get(name), err_msg=name)
  with open(os.path.join(out, CONFIG_FILE)) as f:
    cfg = json.load(f)
  with open(os.path.join(FIXTURE, "lora_config_fields.json")) as f:
    fields = set(json.load(f)["fields"])
  assert set(cfg) - {"peft_type", "task_type"} <= fields  # every key is one peft's LoraConfig takes
  with open(os.path.join(FIXTURE, "adapter", CONFIG_FILE)) as f:
    ref = json.load(f)
  assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (
      ref["r"], ref["lora_alpha"], sorted(ref["target_modules"]))


@pytest.mark.slow  # two more conversions: `bash scripts/test.sh --slow`
def test_merged_model_computes_the_adapted_one(converted, tmp_path):
  merged, hf = str(tmp_path / "merged"), str(tmp_path / "hf")
  convert(src=converted[1], dst=merged, merge=True)
  convert(src=converted[1], dst=hf, dst_format="hf", merge=True)
  adapted, full = checkpoint.load(converted[1]), checkpoint.load(merged)
  assert full.config.lora_rank == 0 and "base" not in full.metadata
  assert not any(lora.is_adapter_name(k.rsplit("/", 1)[-1]) for k in full.metadata["tensors"])
  np.testing.assert_allclose(_logits(full), _logits(adapted), atol=1e-5, rtol=0)
  from gemma_jax.convert.hf import read_hf
  again = read_hf(hf, progress=False)
  for a, b in zip(*(sorted(checkpoint.flatten(t).items()) for t in (again.params, full.params))):
    assert a[0] == b[0]
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]), err_msg=a[0])


def test_adapter_conversions_that_cannot_work_say_why(converted, tmp_path):
  peft_dir = os.path.join(FIXTURE, "adapter")
  with pytest.raises(UserError, match="peft adapter directory: pass --base=PATH"):
    convert(src=peft_dir, dst=str(tmp_path / "a"))
  with pytest.raises(UserError, match="pass --merge to fold them"):
    convert(src=converted[1], dst=str(tmp_path / "b"), dst_format="hf")
  with pytest.raises(UserError, match="carries no adapters; --dst_format=peft"):
    convert(src=converted[0], dst=str(tmp_path / "c"), dst_format="peft")
  with pytest.raises(UserError, match="--merge: .* carries no adapters"):
    convert(src=converted[0], dst=str(tmp_path / "d"), merge=True)
  dora = str(tmp_path / "dora")
  shutil.copytree(peft_dir, dora)
  with open(os.path.join(dora, CONFIG_FILE)) as f:
    cfg = json.load(f)
  with open(os.path.join(dora, CONFIG_FILE), "w") as f:
    json.dump({**cfg, "use_dora": True}, f)
  base = checkpoint.load(converted[0]).config
  with pytest.raises(CheckpointError, match="use_dora=True is not supported; only plain LoRA"):
    read_peft(dora, base)
  with pytest.raises(CheckpointError, match="do not fit a 1-layer base"):
    read_peft(peft_dir, base.replace(num_layers=1))
