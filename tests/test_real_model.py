"""The cached real Gemma 3 270M: converted once (even with concurrent callers), and it is the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import checkpoint, real_model
from gemma_jax.model import Transformer, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "real_270m")

pytestmark = pytest.mark.slow

CALLER = "from gemma_jax.real_model import real_model_path; print(real_model_path())"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A fresh cache filled by two processes calling real_model_path() at the same time."""
  cache = str(tmp_path_factory.mktemp("gemma_jax_cache"))
  env = dict(os.environ, GEMMA_JAX_CACHE=cache, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", CALLER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [p.communicate(timeout=900) + (p.returncode,) for p in procs]
  return cache, results


def test_concurrent_callers_convert_once(cache):
  root, results = cache
  want = os.path.join(root, "gemma3-270m-pt")
  for out, err, rc in results:
    assert rc == 0, err
    assert out.strip() == want
  conversions = sum(err.count("converting the real Gemma 3 270M") for _, err, _ in results)
  assert conversions == 1, [err for _, err, _ in results]
  assert sorted(os.listdir(root)) == ["gemma3-270m-pt", "gemma3-270m-pt.lock"]  # no temporary left


def test_cached_checkpoint_metadata_and_reuse(cache, monkeypatch):
  root, _ = cache
  monkeypatch.setenv("GEMMA_JAX_CACHE", root)
  monkeypatch.setattr(real_model, "_convert", lambda *a: pytest.fail("converted again"))
  path = real_model.real_model_path()
  md = checkpoint.read_metadata(path)
  assert md["kind"] == "pt" and md["template"] == {"name": "gemma3"} and md["param_dtype"] == "float32"
  assert md["config"] == TransformerConfig.gemma3_270m().to_dict()
  assert md["num_params"] == 268_098_176
  conv = md["provenance"]["converted_from"]
  assert conv["format"] == "gguf" and conv["path"].endswith("gemma-3-270m-q4_k_m.gguf")
  assert md["extra"]["real_model"]["conversion"] == real_model.CONVERSION


def test_stale_cache_is_redone(tmp_path, monkeypatch, cache):
  """A cache entry from another conversion version (or a damaged one) is converted again."""
  root, _ = cache
  import shutil
  shutil.copytree(os.path.join(root, "gemma3-270m-pt"), tmp_path / "gemma3-270m-pt")
  monkeypatch.setenv("GEMMA_JAX_CACHE", str(tmp_path))
  calls = []
  monkeypatch.setattr(real_model, "_convert", lambda *a: calls.append(a))
  real_model.real_model_path()
  assert calls == []
  monkeypatch.setattr(real_model, "CONVERSION", real_model.CONVERSION + 1)
  real_model.real_model_path()
  assert len(calls) == 1
  os.remove(tmp_path / "gemma3-270m-pt" / checkpoint.COMPLETE_FILE)
  monkeypatch.setattr(real_model, "CONVERSION", real_model.CONVERSION - 1)
  real_model.real_model_path()
  assert len(calls) == 2


def test_it_is_the_real_model(cache):
  """Tokenizer ids and logits against the HF transformers fixtures of the same GGUF (f32)."""
  root, _ = cache
  ck = checkpoint.load(os.path.join(root, "gemma3-270m-pt"))
  cases = json.load(open(os.path.join(FIXTURES, "tokenizer.json")))["cases"]
  for c in cases:
    assert ck.tokenizer.encode(c["text"], add_bos=True) == c["ids_with_bos"], c["text"]
  ref = np.load(os.path.join(FIXTURES, "logits.npz"))
  model = Transformer(ck.config)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
  for k in (0, 1):
    ids = ref[f"p{k}_ids"]
    logits = np.asarray(fwd(ck.params, jnp.asarray(ids)[None]))[0][ref[f"p{k}_positions"]]
    top = np.take_along_axis(logits, ref[f"p{k}_top_ids"], axis=1)
    np.testing.assert_allclose(top, ref[f"p{k}_top_vals"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(logits[:, ref["probe_ids"]], ref[f"p{k}_probe_vals"], atol=2e-4, rtol=0)
    assert (logits.argmax(-1) == ref[f"p{k}_top_ids"][:, 0]).all()
