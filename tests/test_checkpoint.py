"""Our checkpoint format: bitwise round trips, metadata, atomic saves, sharded restores, clear refusals."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import assert_trees_bitwise_equal, tiny_config
from gemma_jax import checkpoint
from gemma_jax.errors import CheckpointError
from gemma_jax.model import ShardingContext, init_params, make_mesh, param_shardings

TEMPLATE = {"name": "gemma3", "version": 1}  # any JSON dict round-trips; the real ones come from templates.py


def _np_tree(params, dtype=None):
  return jax.tree.map(lambda x: np.asarray(x) if dtype is None else np.asarray(x).astype(dtype), params)


@pytest.fixture(scope="module")
def g3():
  config = tiny_config("gemma3")
  return config, _np_tree(init_params(config, jax.random.key(0)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bitwise_with_metadata(tmp_path, g3, tiny_tokenizer, dtype):
  config, params = g3
  params = _np_tree(params, ml_dtypes.bfloat16 if dtype == "bfloat16" else None)
  path = tmp_path / "ckpt"
  checkpoint.save(path, config=config, params=params, tokenizer=tiny_tokenizer, template=TEMPLATE, kind="it",
                  provenance={"converted_from": {"format": "hf", "path": "/x"}}, extra={"step": 7})
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left
  assert checkpoint.is_checkpoint(path)
  ck = checkpoint.load(path)
  assert_trees_bitwise_equal(params, ck.params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(ck.params))
  assert ck.config == config.replace(param_dtype=dtype)
  assert ck.tokenizer == tiny_tokenizer
  assert ck.template == TEMPLATE and ck.kind == "it" and ck.is_instruction_tuned and not ck.is_pretrained
  md = ck.metadata
  assert md["format"] == "gemma_jax" and md["format_version"] == checkpoint.FORMAT_VERSION
  assert md["family"] == "gemma3" and md["param_dtype"] == dtype and md["extra"] == {"step": 7}
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert md["num_params"] == n == ck.num_params
  assert md["provenance"]["converted_from"] == {"format": "hf", "path": "/x"}
  import gemma_jax
  assert md["provenance"]["gemma_jax_version"] == gemma_jax.__version__
  assert md["tensors"]["embedder/input_embedding"] == {"shape": [config.vocab_size, config.embed_dim],
                                                       "dtype": dtype}
  assert checkpoint.read_metadata(path) == md


def test_no_tokenizer_no_template_and_pt(tmp_path, g3):
  config, params = g3
  checkpoint.save(tmp_path / "c", config=config, params=params, kind="pt")
  ck = checkpoint.load(tmp_path / "c")
  assert ck.tokenizer is None and ck.template is None and ck.chat_template() is None
  assert ck.is_pretrained and ck.kind == "pt"
  assert not os.path.exists(tmp_path / "c" / "tokenizer.model")


def test_dtype_cast_on_load(tmp_path, g3):
  config, params = g3
  checkpoint.save(tmp_path / "c", config=config, params=params)
  ck = checkpoint.load(tmp_path / "c", dtype="bfloat16")
  assert ck.config.param_dtype == "bfloat16"
  assert_trees_bitwise_equal(_np_tree(params, ml_dtypes.bfloat16), _np_tree(ck.params))


def test_sharded_restore_each_device_holds_its_shard(tmp_path, g3):
  config, params = g3
  checkpoint.save(tmp_path / "c", config=config, params=params)
  ctx = ShardingContext(make_mesh("fsdp:4,tensor:2"))
  ck = checkpoint.load(tmp_path / "c", sharding=ctx)
  want = param_shardings(config, ctx)
  emb = ck.params["embedder"]["input_embedding"]
  assert emb.sharding == want["embedder"]["input_embedding"]
  # [V=128, D=48]: vocab over tensor (2), embed over fsdp (4): every device holds a [64, 12] block.
  assert {s.data.shape for s in emb.addressable_shards} == {(64, 12)}
  assert len({s.device for s in emb.addressable_shards}) == 8
  q = ck.params["layer_0"]["attn"]["q_einsum"]["w"]  # [N=4, D=48, H=16]
  assert {s.data.shape for s in q.addressable_shards} == {(2, 12, 16)}
  for got, sh in zip(jax.tree.leaves(ck.params), jax.tree.leaves(want)):
    assert got.sharding == sh
  assert_trees_bitwise_equal(params, _np_tree(ck.params))
  # a Mesh is accepted too
  for kw in ({"sharding": ctx.mesh}, {"mesh": ctx.mesh}):
    ck2 = checkpoint.load(tmp_path / "c", **kw)
    assert ck2.params["embedder"]["input_embedding"].sharding == want["embedder"]["input_embedding"]


def test_save_from_sharded_arrays(tmp_path):
  config = tiny_config("gemma2")
  ctx = ShardingContext(make_mesh("fsdp:4,tensor:2"))
  params = init_params(config, jax.random.key(1), sharding=ctx)
  assert len(params["embedder"]["input_embedding"].sharding.device_set) == 8
  checkpoint.save(tmp_path / "c", config=config, params=params, kind="pt")
  ck = checkpoint.load(tmp_path / "c")
  assert_trees_bitwise_equal(_np_tree(params), _np_tree(ck.params))


# ---------------------------------------------------------------------------------------------------------
# Atomicity


def _fail_in_orbax(monkeypatch, exc=RuntimeError("disk on fire")):
  import orbax.checkpoint as ocp
  real = ocp.Checkpointer.save

  def save(self, directory, *a, **kw):
    real(self, directory, *a, **kw)  # the parameters are written, then the "crash"
    raise exc

  monkeypatch.setattr(ocp.Checkpointer, "save", save)


def test_crash_mid_save_leaves_nothing(tmp_path, g3, monkeypatch):
  config, params = g3
  _fail_in_orbax(monkeypatch)
  with pytest.raises(RuntimeError, match="disk on fire"):
    checkpoint.save(tmp_path / "c", config=config, params=params)
  assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_mid_save_leaves_nothing(tmp_path, g3, monkeypatch):
  config, params = g3
  _fail_in_orbax(monkeypatch, KeyboardInterrupt())
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(tmp_path / "c", config=config, params=params)
  assert os.listdir(tmp_path) == []


def test_crash_while_writing_metadata_keeps_previous_checkpoint(tmp_path, g3, monkeypatch):
  config, params = g3
  path = tmp_path / "c"
  checkpoint.save(path, config=config, params=params, kind="pt")
  real = checkpoint._fsync_write

  def write(p, data):
    if p.endswith(checkpoint.COMPLETE_FILE):
      raise OSError(28, "No space left on device")
    real(p, data)

  monkeypatch.setattr(checkpoint, "_fsync_write", write)
  new = jax.tree.map(lambda x: x + 1, params)
  with pytest.raises(OSError):
    checkpoint.save(path, config=config, params=new, kind="it")
  assert os.listdir(tmp_path) == ["c"]
  ck = checkpoint.load(path)
  assert ck.kind == "pt"
  assert_trees_bitwise_equal(params, _np_tree(ck.params))
  monkeypatch.setattr(checkpoint, "_fsync_write", real)
  checkpoint.save(path, config=config, params=new, kind="it")  # a later save replaces it
  assert checkpoint.load(path).kind == "it" and os.listdir(tmp_path) == ["c"]


def test_killed_save_leaves_a_directory_load_refuses(tmp_path, g3, monkeypatch):
  """What `kill -9` between the parameters and the marker leaves: the temporary directory, never loaded."""
  config, params = g3
  monkeypatch.setattr(checkpoint, "_move_into_place", lambda tmp, path: None)  # "killed" before the rename
  real = checkpoint._fsync_write
  monkeypatch.setattr(checkpoint, "_fsync_write",
                      lambda p, d: None if p.endswith(checkpoint.COMPLETE_FILE) else real(p, d))
  monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)
  checkpoint.save(tmp_path / "c", config=config, params=params)
  (left,) = os.listdir(tmp_path)
  assert left.startswith("c.tmp-")
  assert not os.path.exists(tmp_path / "c")
  assert not checkpoint.is_checkpoint(tmp_path / left)
  with pytest.raises(CheckpointError, match="incomplete gemma_jax checkpoint.*interrupted"):
    checkpoint.load(tmp_path / left)


def test_refuses_to_overwrite_foreign_directory(tmp_path, g3):
  config, params = g3
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "notes.txt").write_text("mine")
  with pytest.raises(CheckpointError, match="is not a gemma_jax checkpoint; refusing to overwrite"):
    checkpoint.save(tmp_path / "d", config=config, params=params)
  assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
  checkpoint.save(tmp_path / "c", config=config, params=params)
  with pytest.raises(CheckpointError, match="exists; delete it"):
    checkpoint.save(tmp_path / "c", config=config, params=params, overwrite=False)


# ---------------------------------------------------------------------------------------------------------
# Validation and refusals


def test_save_checks_params_against_config(tmp_path, g3):
  config, params = g3
  bad = jax.tree.map(lambda x: x, params)
  del bad["layer_3"]["attn"]["_key_norm"]
  with pytest.raises(CheckpointError, match="missing tensor 'layer_3/attn/_key_norm/scale'"):
    checkpoint.save(tmp_path / "c", config=config, params=bad)
  bad = jax.tree.map(lambda x: x, params)
  bad["layer_0"]["extra"] = {"w": np.zeros(3)}
  with pytest.raises(CheckpointError, match="unexpected tensor 'layer_0/extra/w'"):
    checkpoint.save(tmp_path / "c", config=config, params=bad)
  bad = jax.tree.map(lambda x: x, params)
  bad["final_norm"]["scale"] = np.zeros(47, np.float32)
  with pytest.raises(CheckpointError, match=r"'final_norm/scale' has shape \(47,\) but the config implies \(48,\)"):
    checkpoint.save(tmp_path / "c", config=config, params=bad)
  with pytest.raises(CheckpointError, match="kind='chat'"):
    checkpoint.save(tmp_path / "c", config=config, params=params, kind="chat")
  assert os.listdir(tmp_path) == []


def test_load_refusals(tmp_path, g3):
  config, params = g3
  with pytest.raises(CheckpointError, match="no such file or directory"):
    checkpoint.load(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="not a checkpoint; expected a gemma_jax checkpoint directory"):
    checkpoint.load(tmp_path / "empty")
  checkpoint.save(tmp_path / "c", config=config, params=params)
  md_path = tmp_path / "c" / "metadata.json"
  md = json.loads(md_path.read_text())
  md["format_version"] = checkpoint.FORMAT_VERSION + 1
  md_path.write_text(json.dumps(md))
  with pytest.raises(CheckpointError, match="newer than this gemma_jax"):
    checkpoint.load(tmp_path / "c")
  md["format_version"] = checkpoint.FORMAT_VERSION
  md["config"]["num_layers"] = 8
  md["config"]["attention_types"] = []
  md_path.write_text(json.dumps(md))
  with pytest.raises(CheckpointError, match="tensor 'layer_7/.*' is missing from the checkpoint"):
    checkpoint.load(tmp_path / "c")


def test_load_names_the_format_and_the_convert_command(tmp_path):
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}))
  (hf / "model.safetensors").write_bytes(b"")
  with pytest.raises(CheckpointError) as e:
    checkpoint.load(hf)
  msg = str(e.value)
  assert "transformers (HF safetensors) checkpoint, not a gemma_jax checkpoint" in msg
  assert msg.endswith(f"python -m gemma_jax.convert --src={hf} --dst={hf}-gemma_jax") and "\n" not in msg
  gguf = tmp_path / "m.gguf"
  gguf.write_bytes(b"GGUF" + b"\0" * 20)
  with pytest.raises(CheckpointError, match=rf"is a GGUF file.*--src={gguf} --dst={tmp_path}/m-gemma_jax$"):
    checkpoint.load(gguf)
  import orbax.checkpoint as ocp
  ocp.PyTreeCheckpointer().save(tmp_path / "flax", {"transformer": {"final_norm": {"scale": np.zeros(4)}}})
  with pytest.raises(CheckpointError, match="official Flax .orbax. checkpoint.*python -m gemma_jax.convert"):
    checkpoint.load(tmp_path / "flax")


def test_chat_template_object(tmp_path, g3):
  templates = pytest.importorskip("gemma_jax.templates")
  config, params = g3
  t = templates.template_for_family("gemma3")
  checkpoint.save(tmp_path / "c", config=config, params=params, template=t.to_dict(), kind="it")
  got = checkpoint.load(tmp_path / "c").chat_template()
  assert isinstance(got, templates.ChatTemplate) and got.name == t.name and got.to_dict() == t.to_dict()
