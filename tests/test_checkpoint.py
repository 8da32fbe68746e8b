"""Our checkpoint format: bitwise round trips, metadata, atomic saves, sharded restores, clear refusals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess

import jax
import ml_dtypes
import numpy as np
import pytest

from helpers import assert_trees_bitwise_equal, tiny_config
from gemma_jax import checkpoint, integrity
from gemma_jax.errors import CheckpointError, UserError
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
  emb = params["embedder"]["input_embedding"]
  assert md["tensors"]["embedder/input_embedding"] == {"shape": [config.vocab_size, config.embed_dim],
                                                       "dtype": dtype,
                                                       "checksum": integrity.fingerprints({"e": emb})["e"]}
  assert md["checksum_algorithm"] == integrity.ALGORITHM
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
  real = checkpoint.fsync_write

  def write(p, data):
    if p.endswith(checkpoint.COMPLETE_FILE):
      raise OSError(28, "No space left on device")
    real(p, data)

  monkeypatch.setattr(checkpoint, "fsync_write", write)
  new = jax.tree.map(lambda x: x + 1, params)
  with pytest.raises(CheckpointError, match=f"saving {path} failed: No space left on device; the partial copy "
                     f"was removed and the checkpoint already at {path} is intact; free some space"):
    checkpoint.save(path, config=config, params=new, kind="it")
  assert os.listdir(tmp_path) == ["c"]
  ck = checkpoint.load(path)
  assert ck.kind == "pt"
  assert_trees_bitwise_equal(params, _np_tree(ck.params))
  monkeypatch.setattr(checkpoint, "fsync_write", real)
  checkpoint.save(path, config=config, params=new, kind="it")  # a later save replaces it
  assert checkpoint.load(path).kind == "it" and os.listdir(tmp_path) == ["c"]


def test_killed_save_leaves_a_directory_load_refuses(tmp_path, g3, monkeypatch):
  """What `kill -9` between the parameters and the marker leaves: the temporary directory, never loaded."""
  config, params = g3
  monkeypatch.setattr(checkpoint, "move_into_place", lambda tmp, path: None)  # "killed" before the rename
  real = checkpoint.fsync_write
  monkeypatch.setattr(checkpoint, "fsync_write",
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


def test_a_path_orbax_could_not_read_back_is_refused_before_writing(tmp_path, g3):
  """'[' / ']' are glob syntax to orbax: such a save used to "succeed" and the load then found nothing."""
  config, params = g3
  from gemma_jax.training.checkpointing import RunCheckpointer
  for bad in (tmp_path / "run[1]" / "final", tmp_path / "a]b"):
    with pytest.raises(CheckpointError, match=r"'\[' and '\]' in a checkpoint path make it unreadable"):
      checkpoint.save(bad, config=config, params=params)
    assert not os.path.exists(bad)
  with pytest.raises(CheckpointError, match="choose a directory name without them"):
    RunCheckpointer(str(tmp_path / "w[0]" / "checkpoints"), every=1)
  checkpoint.save(tmp_path / "run (1)" / "final", config=config, params=params)  # other punctuation is fine
  checkpoint.load(tmp_path / "run (1)" / "final")


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
  from gemma_jax import templates
  config, params = g3
  t = templates.template_for_family("gemma3")
  checkpoint.save(tmp_path / "c", config=config, params=params, template=t.to_dict(), kind="it")
  got = checkpoint.load(tmp_path / "c").chat_template()
  assert isinstance(got, templates.ChatTemplate) and got.name == t.name and got.to_dict() == t.to_dict()


# ---------------------------------------------------------------------------------------------------------
# Damage: checksums, truncated files, a full disk


def data_files(directory) -> list[str]:
  """The tensorstore (OCDBT) data files under `directory`, largest first."""
  found = [os.path.join(root, f) for root, _, files in os.walk(directory) for f in files
           if os.path.basename(root) == "d" and "ocdbt.process_" in root]
  return sorted(found, key=os.path.getsize, reverse=True)


def flip_bytes(path: str, n: int = 8) -> None:
  """Inverts `n` bytes in the middle of a file (array data, in a data file of any size worth damaging)."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    f.seek(0)
    f.write(data)


def assert_quiet(capfd, caplog) -> None:
  """No traceback on stderr and no ERROR record: the failure was reported once, by the exception."""
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Exception ignored" not in err, err[:2000]
  assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage()[:200] for r in caplog.records]


def _saved_with_victim(tmp_path, g3):
  """(checkpoint path, its first tensor data file, that file's group) of a freshly saved checkpoint."""
  config, params = g3
  path = tmp_path / "c"
  checkpoint.save(path, config=config, params=params)
  victim = data_files(path / "params")[0]
  return path, victim, os.path.relpath(victim, path / "params").split(os.sep)[0]


def test_flipped_bytes_name_the_damaged_tensor(tmp_path, g3, capfd, caplog):
  params = g3[1]
  path, victim, group = _saved_with_victim(tmp_path, g3)
  flip_bytes(victim)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load(path)
  msg = str(e.value)
  assert re.fullmatch(rf"{path}/params/{group}: tensor {group}/\S+ does not match its saved checksum; the "
                      r"checkpoint is damaged; re-create it \(convert or save it again from its source\)", msg), msg
  name = msg.split(": tensor ")[1].split(" ")[0]
  loaded = checkpoint.load(path, verify=False)  # the escape hatch reads it anyway: the damage is real
  from gemma_jax.model.params import flatten
  assert not np.array_equal(np.asarray(flatten(loaded.params)[name]), flatten(params)[name])
  assert_quiet(capfd, caplog)


def test_checkpoints_without_checksums_load_unverified(tmp_path, g3):
  """Checkpoints saved before checksums existed (the real-model cache, older saves) load as before."""
  config, params = g3
  path = tmp_path / "c"
  checkpoint.save(path, config=config, params=params)
  md_path = path / "metadata.json"
  md = json.loads(md_path.read_text())
  del md["checksum_algorithm"]
  for t in md["tensors"].values():
    del t["checksum"]
  md_path.write_text(json.dumps(md))
  assert_trees_bitwise_equal(params, checkpoint.load(path).params)
  assert_trees_bitwise_equal(_np_tree(params, ml_dtypes.bfloat16), checkpoint.load(path, dtype="bfloat16").params)


def test_truncated_tensor_file_is_one_line(tmp_path, g3, capfd, caplog):
  path, victim, group = _saved_with_victim(tmp_path, g3)
  os.truncate(victim, os.path.getsize(victim) // 2)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load(path)
  msg = str(e.value)
  assert msg.startswith(f"{path}/params/{group}: cannot restore the parameters (") and "\n" not in msg, msg
  assert msg.endswith("); the checkpoint is damaged; re-create it (convert or save it again from its source)")
  assert "TensorStore" not in msg and "tensorstore_spec" not in msg and len(msg) < 600
  with pytest.raises(CheckpointError, match="cannot restore the parameters"):
    checkpoint.load(path, verify=False)  # not a checksum question: the data is not there
  assert_quiet(capfd, caplog)


@contextlib.contextmanager
def small_filesystem(path, size_kb: int = 4096):
  """A tmpfs of `size_kb` mounted at `path` (root only; the test is skipped where mounting is refused)."""
  if not hasattr(os, "geteuid") or os.geteuid() != 0:
    pytest.skip("needs root to mount a small tmpfs (a real full disk)")
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                     capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    yield str(path)
  finally:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
      subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: str, leave_kb: int) -> None:
  """Fills the filesystem of `path` until about `leave_kb` are free."""
  st = os.statvfs(path)
  with open(os.path.join(path, "filler"), "wb") as f:
    f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_kb * 1024))


def test_disk_full_save_is_one_line_and_keeps_earlier_checkpoints(tmp_path, g3, capfd, caplog):
  config, params = g3
  with small_filesystem(tmp_path / "fs") as fs:
    a, b = os.path.join(fs, "a"), os.path.join(fs, "b")
    checkpoint.save(a, config=config, params=params, kind="pt")
    fill(fs, leave_kb=200)  # less than a checkpoint (~1.1 MB)
    new = jax.tree.map(lambda x: x + 1, params)
    with pytest.raises(CheckpointError) as e:
      checkpoint.save(b, config=config, params=new)
    assert str(e.value).startswith(f"saving {b} failed: No space left on device (writing {b}.tmp-")
    assert str(e.value).endswith(f"the partial copy was removed and nothing was written to {b}; free some space "
                                 "and save again")
    with pytest.raises(CheckpointError, match=f"saving {a} failed: No space left on device .*the checkpoint "
                       f"already at {a} is intact"):
      checkpoint.save(a, config=config, params=new, kind="it")
    assert sorted(os.listdir(fs)) == ["a", "filler"]  # no temporary directory, no half copy
    ck = checkpoint.load(a)
    assert ck.kind == "pt"
    assert_trees_bitwise_equal(params, ck.params)
  assert_quiet(capfd, caplog)


# ---------------------------------------------------------------------------------------------------------
# Damaged or hostile metadata: one line naming the file and the field


@pytest.fixture(scope="module")
def saved(tmp_path_factory, g3, tiny_tokenizer):
  config, params = g3
  path = tmp_path_factory.mktemp("saved") / "c"
  checkpoint.save(path, config=config, params=params, tokenizer=tiny_tokenizer)
  return path


def _edit(md: dict, **changes) -> dict:
  md = json.loads(json.dumps(md))
  for dotted, value in changes.items():
    *parents, key = dotted.split(".")
    d = md
    for p in parents:
      d = d[p]
    if value is _DELETE:
      del d[key]
    else:
      d[key] = value
  return md


_DELETE = object()
EMB = "tensors.embedder/input_embedding"


@pytest.mark.parametrize("text, message", [
    (lambda md: json.dumps(md)[:300], r"damaged metadata\.json \(Unterminated string"),
    (lambda md: "", r"damaged metadata\.json \(Expecting value"),
    (lambda md: "\xff\xfe garbage", r"damaged metadata\.json"),
    (lambda md: "[" * 100_000 + "]" * 100_000, r"damaged metadata\.json \(nested too deeply\)"),
    (lambda md: "[1, 2]", r"damaged metadata\.json \(expected a JSON object, got list\)"),
    (lambda md: json.dumps(_edit(md, format=_DELETE)), r"damaged metadata\.json \(no 'format' entry\)"),
    (lambda md: json.dumps(_edit(md, format_version="1")), r"damaged metadata\.json \(invalid format_version '1', expected a positive integer\)"),
    (lambda md: json.dumps(_edit(md, format_version=None)), r"invalid format_version None"),
    (lambda md: json.dumps(_edit(md, **{f"{EMB}.shape": _DELETE})),
     r"tensors\['embedder/input_embedding'\]\.shape=None: expected a list of non-negative integers"),
    (lambda md: json.dumps(_edit(md, **{f"{EMB}.shape": "128x48"})), r"\.shape='128x48': expected a list"),
    (lambda md: json.dumps(_edit(md, **{f"{EMB}.checksum": 5})), r"\.checksum=5: expected 16 hex digits"),
    (lambda md: json.dumps(_edit(md, **{"tensors.layer_0/mlp/linear": [1]})),
     r"tensors\['layer_0/mlp/linear'\]=\[1\]: expected \{shape, dtype, checksum\}"),
    (lambda md: json.dumps(_edit(md, tensors=None)), r"tensors=None: expected a JSON object"),
    (lambda md: json.dumps(_edit(md, checksum_algorithm="sha9")), r"checksum_algorithm='sha9' is unknown"),
    (lambda md: json.dumps(_edit(md, tokenizer=5)), r"tokenizer=5: expected a file name inside the checkpoint"),
    (lambda md: json.dumps(_edit(md, tokenizer="/etc/passwd")),
     r"tokenizer: '/etc/passwd' is not a relative name inside .*; refusing to follow it"),
    (lambda md: json.dumps(_edit(md, tokenizer="../../tokenizer.model")),
     r"tokenizer: '\.\./\.\./tokenizer\.model' leads outside .*; refusing to follow it"),
    (lambda md: json.dumps(_edit(md, **{"config.num_layers": "7"})),
     r"damaged metadata\.json \(config field num_layers='7': expected int\); re-create it"),
    (lambda md: json.dumps(_edit(md, **{"config.query_pre_attn_scalar": "20"})),
     r"config field query_pre_attn_scalar='20': expected float"),
    (lambda md: json.dumps(_edit(md, **{"config.use_qk_norm": 1})), r"config field use_qk_norm=1: expected bool"),
    (lambda md: json.dumps(_edit(md, **{"config.attention_types": 5})),
     r"config field attention_types=5: expected a list of strings"),
    (lambda md: json.dumps(_edit(md, **{"config.attention_types": ["global"] * 6 + ["sideways"]})),
     r"bad model config: 'sideways' is not a valid AttentionType"),
    (lambda md: json.dumps(_edit(md, **{"config.family": _DELETE})), r"config has no 'family' field"),
    (lambda md: json.dumps(_edit(md, **{"config.flavour": "mint"})), r"unknown model config field 'flavour' \(1 in "
                                                                    r"all\); written by a newer gemma_jax\?"),
    (lambda md: json.dumps(_edit(md, config=[])), r"config=\[\]: expected the model config"),
    (lambda md: json.dumps(_edit(md, kind="chat")), r"kind='chat': expected 'pt', 'it' or null"),
    (lambda md: json.dumps(_edit(md, template="gemma3")), r"template='gemma3': expected ChatTemplate"),
])
def test_damaged_metadata_is_one_line(tmp_path, saved, text, message):
  import shutil
  path = tmp_path / "c"
  shutil.copytree(saved, path)
  md_path = path / "metadata.json"
  md_path.write_bytes(text(json.loads(md_path.read_text())).encode("utf-8", "surrogateescape"))
  with pytest.raises(CheckpointError) as e:
    checkpoint.load(path)
  msg = str(e.value)
  assert "\n" not in msg and len(msg) < 600, msg
  assert re.search(message, msg), msg
  assert msg.startswith(str(path)), msg  # names the checkpoint (or its metadata.json)


def test_tokenizer_symlink_out_of_the_checkpoint_is_refused(tmp_path, saved):
  import shutil
  path = tmp_path / "c"
  shutil.copytree(saved, path)
  os.replace(path / "tokenizer.model", tmp_path / "elsewhere.model")
  os.symlink(tmp_path / "elsewhere.model", path / "tokenizer.model")
  with pytest.raises(CheckpointError, match="tokenizer: 'tokenizer.model' leads outside"):
    checkpoint.load(path)


def test_garbage_tokenizer_names_the_file(tmp_path, saved):
  import shutil
  path = tmp_path / "c"
  shutil.copytree(saved, path)
  (path / "tokenizer.model").write_bytes(b"not a sentencepiece model at all")
  with pytest.raises(UserError) as e:
    checkpoint.load(path)
  assert str(e.value) == f"{path}/tokenizer.model: not a SentencePiece model (the protobuf does not parse)"


# ---------------------------------------------------------------------------------------------------------
# Leftovers of killed saves


def test_remove_stale_temporaries(tmp_path, g3):
  config, params = g3
  d = tmp_path / "work"
  checkpoint.save(d / "final", config=config, params=params)
  checkpoint.save(d / "best", config=config, params=params)
  # What kill -9 leaves: a save's temporary copy (here with its parameters), an empty one, the previous copy
  # moved aside, and a checkpoint whose only copy is the moved-aside one (killed between the two renames).
  import shutil
  shutil.copytree(d / "final" / "params", d / "final.tmp-1a2b3c4d" / "params")
  (d / "best.tmp-00ff00ff").mkdir()
  shutil.copytree(d / "final", d / "final.old-deadbeef")
  os.rename(d / "best", d / "best.old-0badf00d")
  # Not ours: other names, other contents, a file
  (d / "notes.tmp-12345678").mkdir()
  (d / "notes.tmp-12345678" / "mine.txt").write_text("keep")
  (d / "final.tmp-short").mkdir()
  (d / "log.old-abcdef12").write_text("keep")
  done = checkpoint.remove_stale_temporaries(d)
  assert sorted(os.listdir(d)) == ["best", "final", "final.tmp-short", "log.old-abcdef12", "notes.tmp-12345678"]
  assert done == [f"restored {d}/best from {d}/best.old-0badf00d", f"removed {d}/best.tmp-00ff00ff",
                  f"removed {d}/final.old-deadbeef", f"removed {d}/final.tmp-1a2b3c4d"]
  assert_trees_bitwise_equal(params, checkpoint.load(d / "best").params)
  assert checkpoint.remove_stale_temporaries(d) == []
  assert checkpoint.remove_stale_temporaries(tmp_path / "missing") == []
