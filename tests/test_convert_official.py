"""Official Flax/orbax checkpoints: flat and nested layouts, both gating orientations, presets, bad input."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tiny_config
from gemma_jax.convert.official import infer_config, read_official, write_official
from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import PRESETS, TransformerConfig
from gemma_jax.model.params import param_shapes
from gemma_jax.model.transformer import Transformer

FAMILY_CASES = {
    "gemma1": dict(num_kv_heads=4),  # MHA: qkv_einsum [3, N, D, H] as in gemma1-7b
    "gemma1-mqa": dict(num_kv_heads=1),  # gemma1-2b style
    "gemma2": {},  # GQA, soft-caps, post-norms
    "gemma3": {},  # QK-norm, RoPE scaling
}


def _config(case: str) -> TransformerConfig:
  return tiny_config(case.split("-")[0], **FAMILY_CASES[case])


def _params(config, seed=0):
  """Random f32 params of `config` (numpy; norm scales non-zero, so a dropped or misplaced norm shows)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.3).astype(np.float32), _shapes(config))


@functools.lru_cache(maxsize=None)
def _shapes(config):
  return param_shapes(config)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)  # bitwise


def _logits(config, *params):
  """Logits [1, T, V] of each param tree, through one jitted forward."""
  tokens = jnp.array([[2, 17, 5, 99, 64, 3, 8, 120, 41, 7, 77, 1, 30, 31]])  # longer than the window (6)
  fwd = jax.jit(lambda p: Transformer(config).apply({"params": p}, tokens)[0])
  return [np.asarray(fwd(p)) for p in params]


def _nested_tree(params, *, transformer_level=True, gating_layout="FD"):
  """The Flax module tree layout: MLP leaves without `w`; optionally under "transformer"."""
  tree = jax.tree.map(np.asarray, params)
  if gating_layout == "DF":
    for k, v in tree.items():
      if k.startswith("layer_"):
        v["mlp"]["gating_einsum"] = np.ascontiguousarray(v["mlp"]["gating_einsum"].transpose(0, 2, 1))
  return {"transformer": tree} if transformer_level else tree


@pytest.mark.parametrize("case,gating", [("gemma1", "DF"), ("gemma1-mqa", "FD"), ("gemma2", "DF"),
                                          ("gemma3", "FD")])
def test_flat_layout(tmp_path, case, gating):
  config = _config(case)
  params = _params(config)
  write_official(tmp_path / "ckpt", config, params, gating_layout=gating)
  raw = ocp.PyTreeCheckpointer().restore(str(tmp_path / "ckpt"))
  # The released flat layout, written independently of the reader.
  assert "transformer/embedder" in raw and "transformer/layer_0/attn/attn_vec_einsum" in raw
  g = raw["transformer/layer_0/mlp/gating_einsum"]["w"]
  assert g.shape == ((2, config.hidden_dim, config.embed_dim) if gating == "FD"
                     else (2, config.embed_dim, config.hidden_dim))
  assert ("transformer/layer_0/attn/qkv_einsum" in raw) == (config.num_kv_heads == config.num_heads)

  imp = read_official(tmp_path / "ckpt", preset=config)
  assert imp.config == config
  assert imp.source["layout"] == "flat" and imp.source["gating_layout"] == gating
  _assert_same(imp.params, params)
  ours, ref = _logits(config, imp.params, params)
  assert np.abs(ref).max() > 0.1
  np.testing.assert_array_equal(ours, ref)


def test_released_flat_layout_built_by_hand_without_ocdbt(tmp_path):
  """The flat tree assembled key by key (as docs/WEIGHTS.md 3 lists it), saved in orbax's older per-array format."""
  config = _config("gemma1")
  params = _params(config, seed=5)
  flat = {"transformer/embedder": params["embedder"], "transformer/final_norm": params["final_norm"]}
  for i in range(config.num_layers):
    layer, pre = params[f"layer_{i}"], f"transformer/layer_{i}"
    for name, leaf in layer["attn"].items():
      flat[f"{pre}/attn/{name}"] = leaf  # {"w": ...}
    flat[f"{pre}/mlp/gating_einsum"] = {"w": np.ascontiguousarray(layer["mlp"]["gating_einsum"].transpose(0, 2, 1))}
    flat[f"{pre}/mlp/linear"] = {"w": layer["mlp"]["linear"]}
    for norm in ("pre_attention_norm", "pre_ffw_norm"):
      flat[f"{pre}/{norm}"] = layer[norm]
  assert "transformer/layer_0/attn/qkv_einsum" in flat
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(str(tmp_path / "2b"), flat)
  imp = read_official(tmp_path / "2b", preset=config)
  assert imp.source["layout"] == "flat" and imp.source["gating_layout"] == "DF"
  _assert_same(imp.params, params)


@pytest.mark.parametrize("case,transformer_level", [("gemma1", True), ("gemma2", False), ("gemma3", True)])
def test_nested_layout(tmp_path, case, transformer_level):
  config = _config(case)
  params = _params(config, seed=3)
  gating = "DF" if case == "gemma1" else "FD"
  ocp.PyTreeCheckpointer().save(str(tmp_path / "nested"),
                                _nested_tree(params, transformer_level=transformer_level, gating_layout=gating))
  imp = read_official(tmp_path / "nested", preset=config)
  assert imp.source["layout"] == "nested" and imp.source["gating_layout"] == gating
  _assert_same(imp.params, params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bitwise(tmp_path, dtype):
  config = _config("gemma3").replace(param_dtype=dtype, dtype=dtype)
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), _params(config))
  write_official(tmp_path / "a", config, params)
  first = read_official(tmp_path / "a", preset=config)
  assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(first.params))
  assert first.config.param_dtype == dtype  # kept from the stored arrays (dtype=None)
  write_official(tmp_path / "b", first.config, first.params, gating_layout="DF")
  second = read_official(tmp_path / "b", preset=config)
  _assert_same(first.params, params)
  _assert_same(second.params, params)


def test_dtype_cast_on_restore(tmp_path):
  config = _config("gemma2")
  params = _params(config)
  write_official(tmp_path / "c", config, params)
  imp = read_official(tmp_path / "c", dtype="bfloat16", preset=config)
  assert imp.config.param_dtype == "bfloat16" and imp.config.dtype == "bfloat16"
  want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
  _assert_same(imp.params, want)


def test_every_preset_inferred_from_shapes():
  """Shapes only (no memory): the layout of each real size infers back its preset, in either orientation."""
  for name in PRESETS:
    preset = getattr(TransformerConfig, name)()
    one = _flat_shapes(param_shapes(preset.replace(num_layers=1)))  # layers share their shapes
    flat = {k: v for k, v in one.items() if not k.startswith("layer_")}
    for i in range(preset.num_layers):
      flat.update({k.replace("layer_0/", f"layer_{i}/"): v for k, v in one.items() if k.startswith("layer_0/")})
    assert infer_config(flat, "ckpt") == preset, name
    D, F = preset.embed_dim, preset.hidden_dim
    df = {k: (jax.ShapeDtypeStruct((2, D, F), v.dtype) if k.endswith("gating_einsum") else v)
          for k, v in flat.items()}
    assert infer_config(df, "ckpt") == preset, name
    with pytest.raises(CheckpointError, match="layers .* are missing"):
      infer_config({k: v for k, v in flat.items() if not k.startswith("layer_1/")}, "ckpt")


def _flat_shapes(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else k
    out.update(_flat_shapes(v, key) if isinstance(v, dict) else {key: v})
  return out


def test_tokenizer_kind_and_given_tokenizer(tmp_path, tiny_tokenizer):
  config = _config("gemma2")
  params = _params(config)
  ckpt = tmp_path / "gemma2-2b-it" / "2b-it"
  os.makedirs(ckpt.parent)
  write_official(ckpt, config, params, tokenizer=tiny_tokenizer)
  assert (ckpt.parent / "tokenizer.model").exists()
  imp = read_official(ckpt, preset=config)
  assert imp.tokenizer == tiny_tokenizer and imp.kind == "it"
  assert imp.source["tokenizer"] == str(ckpt.parent / "tokenizer.model")
  write_official(tmp_path / "plain", config, params)
  imp = read_official(tmp_path / "plain", preset=config)
  assert imp.tokenizer is None and imp.kind is None
  imp = read_official(tmp_path / "plain", preset=config, tokenizer=ckpt.parent / "tokenizer.model")
  assert imp.tokenizer == tiny_tokenizer


def test_bad_checkpoints(tmp_path):
  config = _config("gemma3")
  params = _params(config)
  with pytest.raises(CheckpointError, match="not a directory"):
    read_official(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match=r"empty: cannot restore it as an orbax checkpoint"):
    read_official(tmp_path / "empty")

  write_official(tmp_path / "tiny", config, params)
  with pytest.raises(CheckpointError, match=r"tiny: the parameter shapes .* match no preset; pass preset="):
    read_official(tmp_path / "tiny")
  with pytest.raises(CheckpointError, match=r"does not fit the given config \(num_layers: config 26 vs "):
    read_official(tmp_path / "tiny", preset="gemma3-1b")
  with pytest.raises(CheckpointError, match=r"already exists"):
    write_official(tmp_path / "tiny", config, params)

  tree = _nested_tree(params)
  del tree["transformer"]["layer_2"]["pre_ffw_norm"]
  ocp.PyTreeCheckpointer().save(str(tmp_path / "missing"), tree)
  with pytest.raises(CheckpointError, match=r"missing: parameters \['layer_2/pre_ffw_norm/scale'\] are missing"):
    read_official(tmp_path / "missing", preset=config)

  tree = _nested_tree(params)
  tree["transformer"]["layer_1"]["attn"]["attn_vec_einsum"]["w"] = np.zeros((4, 16, 40), np.float32)
  ocp.PyTreeCheckpointer().save(str(tmp_path / "shape"), tree)
  with pytest.raises(CheckpointError, match=r"'layer_1/attn/attn_vec_einsum/w' has shape \[4, 16, 40\]"):
    read_official(tmp_path / "shape", preset=config)

  tree = _nested_tree(params)
  tree["transformer"]["lm_head"] = {"w": np.zeros((3,), np.float32)}
  ocp.PyTreeCheckpointer().save(str(tmp_path / "extra"), tree)
  with pytest.raises(CheckpointError, match=r"unexpected parameters \['lm_head/w'\]"):
    read_official(tmp_path / "extra", preset=config)

  ocp.PyTreeCheckpointer().save(str(tmp_path / "notgemma"), {"dense": {"kernel": np.zeros((2, 2))}})
  with pytest.raises(CheckpointError, match=r"no embedder/input_embedding"):
    read_official(tmp_path / "notgemma")


def test_square_gating_needs_an_explicit_layout(tmp_path):
  config = _config("gemma1").replace(hidden_dim=48)  # F == D
  params = _params(config)
  write_official(tmp_path / "sq", config, params, gating_layout="DF")
  with pytest.raises(CheckpointError, match="square .* pass gating_layout="):
    read_official(tmp_path / "sq", preset=config)
  _assert_same(read_official(tmp_path / "sq", preset=config, gating_layout="DF").params, params)
