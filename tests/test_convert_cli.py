"""`python -m gemma_jax.convert` end to end (subprocesses), source detection, and every bad input of issue 4.

Every bad input must give exactly one line `error: ...` naming the file or tensor, a non-zero exit, no
traceback, and nothing at --dst (no temporary directory either).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from helpers import assert_trees_bitwise_equal, tiny_config
from gemma_jax import checkpoint
from gemma_jax.convert.detect import detect_format
from gemma_jax.errors import CheckpointError
from gemma_jax.model import init_params

pytestmark = pytest.mark.slow  # end to end, as processes: `bash scripts/test.sh --slow`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  return env


def _cli_args(*args):
  return [sys.executable, "-m", "gemma_jax.convert", *args]


def run_cli(*args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(_cli_args(*args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _np(tree, dtype=None):
  return jax.tree.map(lambda x: np.asarray(x) if dtype is None else np.asarray(x).astype(dtype), tree)


def _leftovers(dst: str) -> list[str]:
  parent, base = os.path.split(dst)
  return sorted(f for f in os.listdir(parent) if f == base or f.startswith(base + "."))


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
  """A tiny Gemma 2 (sliding window, soft-caps, post norms) with a 320-row vocabulary for the tokenizer."""
  config = tiny_config("gemma2", vocab_size=320)
  return config, _np(init_params(config, jax.random.key(3))), tiny_tokenizer


@pytest.fixture(scope="module")
def sources(model, tmp_path_factory):
  """The same model as a native checkpoint, an HF directory and an official Flax checkpoint."""
  from gemma_jax.convert.hf import write_hf
  config, params, tok = model
  d = tmp_path_factory.mktemp("sources")
  checkpoint.save(d / "native", config=config, params=params, tokenizer=tok, kind="it",
                  template={"name": "gemma"})
  write_hf(str(d / "hf"), config, params, tokenizer=tok, progress=False)
  from gemma_jax.convert.official import write_official
  (d / "off").mkdir()
  write_official(str(d / "off" / "official"), config, params, tokenizer=tok)  # tokenizer.model beside it
  (d / "config.json").write_text(json.dumps(config.to_dict()))  # no preset: the shapes cannot say it all
  return {"native": str(d / "native"), "hf": str(d / "hf"), "official": str(d / "off" / "official"),
          "config_json": str(d / "config.json")}


# ---------------------------------------------------------------------------------------------------------
# Detection


def test_detect_format(sources, tmp_path):
  for fmt in ("native", "hf", "official"):
    assert detect_format(sources[fmt]) == fmt
  gguf = tmp_path / "x.gguf"
  gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
  assert detect_format(gguf) == "gguf"
  for inner in ("params", "params/layer_0"):
    with pytest.raises(CheckpointError, match="is inside a gemma_jax checkpoint; pass the checkpoint directory"):
      detect_format(os.path.join(sources["native"], inner))
  (tmp_path / "g").mkdir()
  (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
  with pytest.raises(CheckpointError, match=r"pass the file itself, e.g. --src=.*g/m.gguf"):
    detect_format(tmp_path / "g")
  (tmp_path / "lone.safetensors").write_bytes(b"\0" * 8)
  with pytest.raises(CheckpointError, match="a lone safetensors file; pass the directory"):
    detect_format(tmp_path / "lone.safetensors")
  (tmp_path / "w.pt").write_bytes(b"\x80\x02")
  with pytest.raises(CheckpointError, match="pickle-based weights \\(w.pt\\) are refused"):
    detect_format(tmp_path / "w.pt")


# ---------------------------------------------------------------------------------------------------------
# End to end


def _read_dst(path: str, dst_format: str):
  if dst_format == "native":
    ck = checkpoint.load(path)
    return ck.config, _np(ck.params), ck
  from gemma_jax.convert.hf import read_hf
  imp = read_hf(path, progress=False)
  return imp.config, imp.params, imp


@pytest.mark.parametrize("src_format", ["native", "hf", "official"])
@pytest.mark.parametrize("dst_format", ["native", "hf"])
def test_convert_end_to_end(model, sources, tmp_path, src_format, dst_format):
  config, params, tok = model
  dst = str(tmp_path / "out")
  extra = [f"--config_json={sources['config_json']}"] if src_format == "official" else []
  r = run_cli(f"--src={sources[src_format]}", f"--dst={dst}", f"--dst_format={dst_format}", *extra)
  assert r.returncode == 0, r.stderr
  assert f"wrote {dst} ({dst_format}, from {src_format})" in r.stderr
  assert _leftovers(dst) == ["out"]
  got_config, got_params, got = _read_dst(dst, dst_format)
  assert_trees_bitwise_equal(params, got_params)
  assert got_config.to_dict() == {**config.to_dict(), "preset": got_config.preset}
  assert got.tokenizer == tok
  if dst_format == "native":
    md = got.metadata
    assert md["provenance"]["converted_from"]["format"] == src_format
    assert md["provenance"]["converted_from"]["path"] == os.path.abspath(sources[src_format])
    assert got.template == {"name": "gemma"}  # saved one kept (native), else Gemma 2's (auto)
    assert got.kind == ("it" if src_format == "native" else None)
  else:
    from gemma_jax.templates import HF_CHAT_TEMPLATES
    tc = json.load(open(os.path.join(dst, "tokenizer_config.json")))
    assert tc["chat_template"] == HF_CHAT_TEMPLATES["gemma"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_to_native_to_hf_is_bitwise(model, tmp_path, dtype):
  """HF -> ours -> HF gives back identical safetensors tensors, config and generation config."""
  from gemma_jax.convert.hf import write_hf
  from safetensors import safe_open
  config, params, tok = model
  src = str(tmp_path / "hf")
  write_hf(src, config, params, tokenizer=tok, dtype=dtype, progress=False)
  r = run_cli(f"--src={src}", f"--dst={tmp_path}/native", "--kind=pt", "--template=none")
  assert r.returncode == 0, r.stderr
  ck = checkpoint.load(tmp_path / "native")
  assert ck.kind == "pt" and ck.template is None and ck.metadata["param_dtype"] == dtype
  r = run_cli(f"--src={tmp_path}/native", f"--dst={tmp_path}/hf2", "--dst_format=hf")
  assert r.returncode == 0, r.stderr

  def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
      if f.endswith(".safetensors"):
        with open(os.path.join(d, f), "rb") as fh:
          n = int.from_bytes(fh.read(8), "little")
          header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        out.update({k: (v["dtype"], v["shape"]) for k, v in header.items()})
    return out

  assert tensors(src) == tensors(tmp_path / "hf2")
  assert open(os.path.join(src, "model.safetensors"), "rb").read() == \
      open(tmp_path / "hf2" / "model.safetensors", "rb").read()
  for f in ("config.json", "generation_config.json", "tokenizer.model"):
    assert open(os.path.join(src, f), "rb").read() == open(tmp_path / "hf2" / f, "rb").read(), f


def test_dtype_flag_and_overwrite(model, sources, tmp_path):
  config, params, _ = model
  dst = str(tmp_path / "out")
  r = run_cli(f"--src={sources['hf']}", f"--dst={dst}", "--dtype=bfloat16", "--template=gemma3")
  assert r.returncode == 0, r.stderr
  ck = checkpoint.load(dst)
  assert ck.metadata["param_dtype"] == "bfloat16" and ck.template == {"name": "gemma3"}
  assert_trees_bitwise_equal(_np(params, ml_dtypes.bfloat16), _np(ck.params))
  r = run_cli(f"--src={sources['hf']}", f"--dst={dst}")
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
      f"error: {dst} exists; delete it, choose another --dst, or pass --overwrite")
  assert checkpoint.load(dst).metadata["param_dtype"] == "bfloat16"  # untouched
  r = run_cli(f"--src={sources['hf']}", f"--dst={dst}", "--overwrite")
  assert r.returncode == 0, r.stderr
  assert checkpoint.load(dst).metadata["param_dtype"] == "float32" and _leftovers(dst) == ["out"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing left at --dst


def _hf_variant(src: str, dst: str, edit) -> str:
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  f = os.path.join(dst, "model.safetensors")
  tensors = load_file(f)
  edit(tensors, dst)
  save_file(tensors, f, metadata={"format": "pt"})
  return dst


def _bad_inputs(sources, root, gguf_path):
  hf = sources["hf"]
  cases = {}
  os.makedirs(f"{root}/notes")
  open(f"{root}/notes/readme.txt", "w").write("hello")
  cases["not_a_checkpoint"] = (f"{root}/notes", "not a checkpoint; expected a gemma_jax checkpoint directory")
  cases["missing_path"] = (f"{root}/nothing_here", "nothing_here: no such file or directory")
  cases["missing_tensor"] = (
      _hf_variant(hf, f"{root}/missing", lambda t, d: t.pop("model.layers.1.mlp.down_proj.weight")),
      "model.layers.1.mlp.down_proj.weight")
  cases["extra_tensor"] = (
      _hf_variant(hf, f"{root}/extra", lambda t, d: t.update({"model.layers.0.self_attn.rotary.weight":
                                                               np.zeros(4, np.float32)})),
      "model.layers.0.self_attn.rotary.weight")

  def wrong_shape(t, d):
    t["model.layers.2.self_attn.o_proj.weight"] = np.zeros((48, 32), np.float32)
  cases["wrong_shape"] = (_hf_variant(hf, f"{root}/shape", wrong_shape), "model.layers.2.self_attn.o_proj.weight")

  shutil.copytree(hf, f"{root}/cfgshape")
  cfg = json.load(open(f"{root}/cfgshape/config.json"))
  cfg["intermediate_size"] = cfg["intermediate_size"] * 2
  json.dump(cfg, open(f"{root}/cfgshape/config.json", "w"))
  cases["config_contradiction"] = (f"{root}/cfgshape", "mlp")

  shutil.copytree(hf, f"{root}/trunc")
  f = f"{root}/trunc/model.safetensors"
  data = open(f, "rb").read()
  open(f, "wb").write(data[:len(data) // 2])
  cases["truncated_safetensors"] = (f"{root}/trunc", "trunc/model.safetensors")
  shutil.copytree(hf, f"{root}/garbage")
  open(f"{root}/garbage/model.safetensors", "wb").write(b"\xff" * 64)
  cases["corrupt_safetensors"] = (f"{root}/garbage", "garbage/model.safetensors")

  with open(gguf_path, "rb") as src, open(f"{root}/trunc.gguf", "wb") as dst:
    dst.write(src.read(os.path.getsize(gguf_path) // 2))
  cases["truncated_gguf"] = (f"{root}/trunc.gguf", "trunc.gguf")
  with open(gguf_path, "rb") as src, open(f"{root}/header.gguf", "wb") as dst:
    dst.write(src.read(3000))
  cases["truncated_gguf_header"] = (f"{root}/header.gguf", "header.gguf")

  os.makedirs(f"{root}/llama")
  json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64},
            open(f"{root}/llama/config.json", "w"))
  shutil.copy(f"{hf}/model.safetensors", f"{root}/llama/model.safetensors")
  cases["llama_dir"] = (f"{root}/llama", "unsupported architecture (LlamaForCausalLM")

  os.makedirs(f"{root}/pickle")
  shutil.copy(f"{hf}/config.json", f"{root}/pickle/config.json")
  # A pickle whose unpickling would create a file: it must never be unpickled.
  import pickle
  class Boom:
    def __reduce__(self):
      return (open, (f"{root}/UNPICKLED", "w"))
  open(f"{root}/pickle/pytorch_model.bin", "wb").write(pickle.dumps(Boom()))
  cases["pickle_only_dir"] = (f"{root}/pickle", "pickle-based weights (pytorch_model.bin) are refused")
  cases["pickle_file"] = (f"{root}/pickle/pytorch_model.bin", "are refused")
  cases["official_without_preset"] = (sources["official"], "preset")  # a tiny model: no preset matches
  return cases


@pytest.fixture(scope="module")
def bad_results(sources, tmp_path_factory, real_gguf_path):
  """Runs the CLI on every bad input at once (the runs are independent) and collects the results."""
  root = str(tmp_path_factory.mktemp("bad"))
  cases = _bad_inputs(sources, root, real_gguf_path)
  procs = {}
  for name, (src, _) in cases.items():
    for dst_format in ("native", "hf") if name in BOTH_DST else ("native",):
      dst = f"{root}/out_{name}_{dst_format}"
      procs[name, dst_format] = (dst, subprocess.Popen(
          _cli_args(f"--src={src}", f"--dst={dst}", f"--dst_format={dst_format}"), cwd=ROOT, env=_env(),
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = {}
  for key, (dst, p) in procs.items():
    out, err = p.communicate(timeout=600)
    results[key] = (p.returncode, out, err, dst)
  return cases, results, root


BAD = ["not_a_checkpoint", "missing_path", "missing_tensor", "extra_tensor", "wrong_shape", "config_contradiction",
       "truncated_safetensors", "corrupt_safetensors", "truncated_gguf", "truncated_gguf_header", "llama_dir",
       "pickle_only_dir", "pickle_file", "official_without_preset"]


BOTH_DST = ["missing_tensor", "truncated_safetensors", "pickle_only_dir"]


@pytest.mark.parametrize("case,dst_format", [(c, "native") for c in BAD] + [(c, "hf") for c in BOTH_DST])
def test_bad_input(bad_results, case, dst_format):
  """The reading fails before anything is written, whatever the destination format; both are run for some."""
  cases, results, root = bad_results
  rc, out, err, dst = results[case, dst_format]
  lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
  assert rc == 1, err
  assert "Traceback" not in err, err
  assert sum(l.startswith("error: ") for l in lines) == 1, err
  assert lines[-1].startswith("error: "), err
  assert cases[case][1] in lines[-1], lines[-1]
  assert out == ""
  assert _leftovers(dst) == [], _leftovers(dst)
  assert not os.path.exists(os.path.join(root, "UNPICKLED"))


def test_usage_errors(tmp_path):
  r = run_cli("--src=x")
  assert r.returncode == 1 and r.stderr.strip().startswith("error: both --src=PATH and --dst=PATH are required")
  r = run_cli(f"--src={tmp_path}", f"--dst={tmp_path}")
  assert r.returncode == 1 and "are the same path" in r.stderr
  r = run_cli(f"--src={tmp_path}", f"--dst={tmp_path}/o", "--dtype=int8")
  assert r.returncode == 1 and r.stderr.strip() == "error: --dtype=int8: use one of float32, bfloat16, float16"


def _readonly_dir(path) -> bool:
  """Makes `path` a directory nobody can write in (root too, with chattr +i where it can); False if impossible."""
  os.makedirs(path)
  os.chmod(path, 0o500)
  if os.geteuid() == 0:
    subprocess.run(["chattr", "+i", str(path)], capture_output=True)
  try:
    os.mkdir(os.path.join(path, "probe"))
  except OSError:
    return True
  os.rmdir(os.path.join(path, "probe"))
  return False


def _writable_again(path) -> None:
  subprocess.run(["chattr", "-i", str(path)], capture_output=True)
  os.chmod(path, 0o700)


def test_flags_and_destination_are_checked_before_reading(sources, tmp_path, monkeypatch):
  """A --template typo or an unwritable --dst fails at once, not after reading the whole source."""
  from gemma_jax.convert import detect, run
  from gemma_jax.errors import UserError

  def never(*a, **k):
    raise AssertionError("the source was read before the flags and --dst were checked")
  monkeypatch.setattr(detect, "detect_format", never)
  monkeypatch.setattr(run, "_read", never)
  (tmp_path / "afile").write_text("x")
  cases = [(dict(dst=str(tmp_path / "out"), template="gemma5"),
            "--template=gemma5: not a chat template; use auto, none or one of gemma, gemma3, gemma4, completion"),
           (dict(dst=str(tmp_path / "afile" / "out")),
            f"--dst={tmp_path}/afile/out: {tmp_path}/afile is not a directory; choose another --dst")]
  ro = tmp_path / "ro"
  try:
    if _readonly_dir(ro):
      cases.append((dict(dst=str(ro / "a" / "out")), f"--dst={ro}/a/out: cannot write in {ro} ("))
    for kw, message in cases:
      with pytest.raises(UserError) as e:
        run.convert(src=sources["hf"], **kw)
      assert str(e.value).startswith(message), str(e.value)
    assert len(cases) == 3 or os.geteuid() == 0  # only root may lack a way to make a directory read-only
  finally:
    if ro.exists():
      _writable_again(ro)
  assert sorted(os.listdir(tmp_path)) == ["afile", "ro"]  # the write probe left nothing


def test_cli_checks_before_reading(sources, tmp_path):
  (tmp_path / "afile").write_text("x")
  procs = [subprocess.Popen(_cli_args(f"--src={sources['hf']}", *args), cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for args in ([f"--dst={tmp_path}/out", "--template=gemma5"], [f"--dst={tmp_path}/afile/out"])]
  for p, message in zip(procs, ["error: --template=gemma5: not a chat template",
                                f"error: --dst={tmp_path}/afile/out: {tmp_path}/afile is not a directory"]):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1 and err.startswith(message) and len(err.splitlines()) == 1, err
    assert out == ""


# orbax's and tensorstore's worker threads go on for a moment after Ctrl-C: they create files in the directory
# being removed and print tracebacks once their event loop is closed ("RuntimeError: Event loop is closed").
_INTERRUPTED_SAVE = """
import os, threading, time, orbax.checkpoint as ocp
real = ocp.Checkpointer.save
def save(self, directory, *a, **k):
  real(self, directory, *a, **k)
  tmp = os.path.dirname(os.path.dirname(os.fspath(directory)))  # <dst>.tmp-*/params/<group>
  def worker():
    while os.path.exists(tmp):
      time.sleep(0.01)
    os.makedirs(os.path.join(tmp, "params", "late"))
    os.write(2, b"Traceback (most recent call last):\\nRuntimeError: Event loop is closed\\n")
  threading.Thread(target=worker).start()
  open(FLAG, "w").close()
  time.sleep(60)
ocp.Checkpointer.save = save
"""
# Ctrl-C after the checkpoint is complete, while the interpreter exits (jax's atexit handler, for one).
_INTERRUPTED_EXIT = """
import atexit, time
atexit.register(lambda: (open(FLAG, "w").close(), time.sleep(3)))
"""


def test_interrupt_leaves_nothing(sources, tmp_path):
  """Ctrl-C while the destination is written: exit 130, one line, no traceback from worker threads, nothing
  at --dst; Ctrl-C once it is written: exit 0, no traceback."""
  import signal
  import time
  procs = {}
  for name, patch in (("mid_write", _INTERRUPTED_SAVE), ("at_exit", _INTERRUPTED_EXIT)):
    flag, dst = str(tmp_path / f"flag_{name}"), str(tmp_path / name)
    code = (f"FLAG = {flag!r}\n{patch}\nimport sys; sys.argv = ['convert', '--src={sources['hf']}', '--dst={dst}']\n"
            "from absl import app; from gemma_jax.convert.__main__ import main; app.run(main)\n")
    procs[name] = (flag, dst, subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = {}
  for name, (flag, dst, p) in procs.items():
    deadline = time.time() + 300
    while not os.path.exists(flag) and time.time() < deadline and p.poll() is None:
      time.sleep(0.05)
    assert os.path.exists(flag), p.communicate()[1]
    if name == "mid_write":
      assert [f for f in os.listdir(tmp_path) if f.startswith("mid_write.tmp-")]  # it was mid-write
    p.send_signal(signal.SIGINT)
    results[name] = p.communicate(timeout=120)[1], p.returncode
  err, rc = results["mid_write"]
  assert rc == 130 and "Traceback" not in err, err
  assert err.strip().splitlines()[-1] == f"error: interrupted; nothing was written to {tmp_path}/mid_write"
  assert _leftovers(str(tmp_path / "mid_write")) == []
  err, rc = results["at_exit"]
  assert rc == 0 and "Traceback" not in err and f"wrote {tmp_path}/at_exit" in err, err
  assert checkpoint.load(tmp_path / "at_exit").metadata["num_params"] > 0


def test_undo_partial_write_puts_an_overwritten_checkpoint_back(tmp_path):
  """Ctrl-C between the two renames of --overwrite (dst moved aside, the new one not yet in place)."""
  from gemma_jax.convert.run import identity, partial_outputs, undo_partial_write
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "metadata.json").write_text("{}")
  (tmp_path / "out.tmp-0000").mkdir()  # an older leftover, not ours: kept
  before, dst_id = partial_outputs(str(dst)), identity(str(dst))
  os.rename(dst, tmp_path / "out.old-1234")
  (tmp_path / "out.tmp-5678" / "params").mkdir(parents=True)
  assert undo_partial_write(str(dst), before, dst_id) == f"interrupted; nothing was written to {dst}"
  assert sorted(os.listdir(tmp_path)) == ["out", "out.tmp-0000"] and identity(str(dst)) == dst_id
  os.rename(tmp_path / "out.tmp-0000", tmp_path / "new")
  os.rename(tmp_path / "new", dst.with_name("out.tmp-9"))
  shutil.rmtree(dst)
  os.rename(dst.with_name("out.tmp-9"), dst)  # the new output renamed into place just before Ctrl-C
  assert undo_partial_write(str(dst), set(), dst_id) == (f"interrupted, but {dst} had already been written "
                                                          "completely")
  assert os.listdir(tmp_path) == ["out"]


# ---------------------------------------------------------------------------------------------------------
# The real Gemma 3 270M GGUF


@pytest.mark.slow
def test_real_gguf_to_native_and_hf(real_gguf_path, tmp_path):
  r = run_cli(f"--src={real_gguf_path}", f"--dst={tmp_path}/native")
  assert r.returncode == 0, r.stderr
  ck = checkpoint.load(tmp_path / "native")
  from gemma_jax.model import TransformerConfig
  assert ck.config == TransformerConfig.gemma3_270m()
  assert ck.kind == "pt" and ck.template == {"name": "gemma3"} and ck.metadata["num_params"] == 268_098_176
  assert ck.tokenizer.encode("The capital of France is", add_bos=True) == [2, 818, 5279, 529, 7001, 563]
  assert ck.metadata["provenance"]["converted_from"]["format"] == "gguf"
  r = run_cli(f"--src={real_gguf_path}", f"--dst={tmp_path}/hf", "--dst_format=hf")
  assert r.returncode == 0, r.stderr
  from gemma_jax.convert.hf import read_hf
  imp = read_hf(str(tmp_path / "hf"), progress=False)
  assert imp.config.to_dict() == ck.config.to_dict()
  assert_trees_bitwise_equal(_np(ck.params), imp.params)
  gen = json.load(open(tmp_path / "hf" / "generation_config.json"))
  assert gen["eos_token_id"] == [1, 106]
  tc = json.load(open(tmp_path / "hf" / "tokenizer_config.json"))
  assert "<start_of_turn>" in tc["chat_template"]
