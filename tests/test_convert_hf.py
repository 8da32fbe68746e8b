"""HF transformers conversion: config mapping (legacy and new keys), lossless round trips, embedding rows,
multimodal checkpoints, sharding, and one clear error per kind of bad input.

Fixtures: tests/fixtures/hf (tools/make_hf_fixtures.py, written by transformers itself).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest

from gemma_jax.convert.hf import read_hf, write_hf
from gemma_jax.convert.hf_config import config_from_hf, config_to_hf
from gemma_jax.convert.safetensors_io import SafetensorsFile
from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import flatten as flatten_tree

from helpers import tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("gemma1_mqa", "gemma1_mha", "gemma2", "gemma3", "gemma4", "gemma4_kv", "gemma4_edge", "gemma4_moe")


def st_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint dir, read independently of read_hf (safetensors' own reader; bf16 via ours)."""
  from safetensors import safe_open
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(path, f), framework="numpy") as st:
        for n in st.keys():
          sl = st.get_slice(n)
          if sl.get_dtype() == "BF16":
            out[n] = SafetensorsFile(os.path.join(path, f)).get(n)
          else:
            out[n] = st.get_tensor(n)
  return out


def assert_bitwise_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for n in a:
    assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
    assert a[n].tobytes() == b[n].tobytes(), n


def copy_fixture(name, tmp_path) -> str:
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  return str(dst)


def one_line_error(excinfo, *fragments):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for f in fragments:
    assert f in msg, (f, msg)
  return msg


# ---------------------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("name", NAMES + ("gemma2_bf16", "gemma3_bf16"))
def test_hf_to_ours_to_hf_is_bitwise_identical(name, tmp_path):
  src = os.path.join(FIXTURES, name)
  imp = read_hf(src, progress=False)
  out = tmp_path / "out"
  write_hf(str(out), imp.config, imp.params, progress=False)
  assert_bitwise_equal(st_tensors(src), st_tensors(str(out)))
  if name.endswith("bf16"):
    assert imp.params["final_norm"]["scale"].dtype == ml_dtypes.bfloat16
  # The config: every key we write agrees with what transformers wrote.
  theirs = json.load(open(os.path.join(src, "config.json")))
  ours = json.load(open(out / "config.json"))
  for k, v in ours.items():
    if k in theirs and k not in ("architectures",):
      assert theirs[k] == v, (k, theirs[k], v)
  assert set(ours["architectures"]) == set(theirs["architectures"])
  # ours -> HF -> ours is the identity too.
  again = read_hf(str(out), progress=False)
  assert again.config == imp.config


@pytest.mark.parametrize("family", ["gemma1", "gemma2", "gemma3"])
def test_config_round_trip(family):
  for c in (tiny_config(family, num_kv_heads=4 if family == "gemma1" else 2,
                        query_pre_attn_scalar=16 if family == "gemma1" else 20),
            TransformerConfig.from_preset({"gemma1": "gemma1-7b", "gemma2": "gemma2-27b",
                                           "gemma3": "gemma3-12b"}[family])):
    back = config_from_hf(config_to_hf(c, vocab_rows=c.vocab_size))
    assert back.replace(preset=c.preset) == c


def test_gemma4_kv_tensors_of_shared_layers_are_ignored_and_bad_moe_sizes_are_one_line(tmp_path):
  """Hub files may hold k/v projections for Gemma 4's KV-shared layers, which HF never builds (it ignores them
  on load): read the same model with them. A MoE config without its sizes is one line."""
  from safetensors.numpy import load_file, save_file
  d = copy_fixture("gemma4_edge", tmp_path)
  tensors = load_file(os.path.join(d, "model.safetensors"))
  tensors["model.layers.6.self_attn.k_proj.weight"] = np.ones((32, 32), np.float32)
  tensors["model.layers.7.self_attn.v_norm.weight"] = np.ones((32,), np.float32)
  save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  ref, got = read_hf(os.path.join(FIXTURES, "gemma4_edge"), progress=False), read_hf(d, progress=False)
  assert got.config == ref.config
  assert_bitwise_equal(dict(flatten_tree(got.params)), dict(flatten_tree(ref.params)))
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg.update(enable_moe_block=True, num_experts=4, top_k_experts="two", moe_intermediate_size=16)
  with pytest.raises(CheckpointError) as e:
    config_from_hf(cfg, "config.json")
  one_line_error(e, "config.json: top_k_experts must be an integer")


def test_dtype_cast_on_import_and_export(tmp_path):
  src = os.path.join(FIXTURES, "gemma3")
  imp = read_hf(src, dtype="bfloat16", progress=False)
  assert imp.params["embedder"]["input_embedding"].dtype == ml_dtypes.bfloat16
  assert imp.config.param_dtype == "bfloat16"
  write_hf(str(tmp_path / "o"), imp.config, read_hf(src, progress=False).params, dtype="bfloat16", progress=False)
  a, b = st_tensors(os.path.join(FIXTURES, "gemma3_bf16")), st_tensors(str(tmp_path / "o"))
  assert_bitwise_equal(a, b)  # our f32 -> bf16 cast equals torch's (round to nearest even)
  assert json.load(open(tmp_path / "o" / "config.json"))["dtype"] == "bfloat16"


def test_sharded_write_and_read(tmp_path):
  src = os.path.join(FIXTURES, "gemma2")
  imp = read_hf(src, progress=False)
  out = tmp_path / "sharded"
  write_hf(str(out), imp.config, imp.params, progress=False, shard_bytes=60_000)
  index = json.load(open(out / "model.safetensors.index.json"))
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert_bitwise_equal(st_tensors(src), st_tensors(str(out)))
  back = read_hf(str(out), progress=False)
  for a, b in zip(_leaves(imp.params), _leaves(back.params)):
    assert a.tobytes() == b.tobytes()


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_tokenizer_template_and_generation_config(tmp_path, tiny_tokenizer):
  imp = read_hf(os.path.join(FIXTURES, "gemma3"), progress=False)
  template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>\n{% endfor %}"
  out = tmp_path / "o"
  write_hf(str(out), imp.config, imp.params, tokenizer=tiny_tokenizer, chat_template=template, progress=False)
  gen = json.load(open(out / "generation_config.json"))
  sp = tiny_tokenizer.special
  assert gen["eos_token_id"] == [sp.eos, sp.end_of_turn] and gen["bos_token_id"] == sp.bos
  back = read_hf(str(out), progress=False)
  assert back.tokenizer == tiny_tokenizer and back.chat_template == template and back.kind is None
  # Without a tokenizer: the family's end_of_turn id.
  write_hf(str(tmp_path / "o2"), imp.config, imp.params, progress=False)
  assert json.load(open(tmp_path / "o2" / "generation_config.json"))["eos_token_id"] == [1, 106]
  # chat_template.jinja (newer transformers) is read too.
  d = copy_fixture("gemma2", tmp_path)
  open(os.path.join(d, "chat_template.jinja"), "w").write("JINJA")
  assert read_hf(d, progress=False).chat_template == "JINJA"


# ---------------------------------------------------------------------------------------------------------
# Embedding rows

@pytest.mark.parametrize("family,official,hf_rows", [("gemma2", 256128, 256000), ("gemma3", 262208, 262144)])
def test_embedding_rows_both_directions(family, official, hf_rows, tmp_path):
  import jax
  from gemma_jax.model.params import param_shapes
  config = tiny_config(family, vocab_size=official, embed_dim=8, hidden_dim=16, num_heads=2, num_kv_heads=1,
                       head_dim=8, num_layers=2 if family == "gemma2" else 6)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), param_shapes(config))
  out = tmp_path / "o"
  write_hf(str(out), config, params, progress=False)
  assert json.load(open(out / "config.json"))["vocab_size"] == hf_rows
  emb = st_tensors(str(out))["model.embed_tokens.weight"]
  assert emb.shape == (hf_rows, 8)
  np.testing.assert_array_equal(emb, params["embedder"]["input_embedding"][:hf_rows])
  kept = read_hf(str(out), progress=False)  # import keeps the source's rows
  assert kept.config.vocab_size == hf_rows
  padded = read_hf(str(out), progress=False, vocab_rows=official)  # pad back to the official count
  assert padded.config.vocab_size == official
  table = padded.params["embedder"]["input_embedding"]
  assert table.shape == (official, 8)
  np.testing.assert_array_equal(table[:hf_rows], emb)
  assert not table[hf_rows:].any()
  # An explicit row count on export wins.
  write_hf(str(tmp_path / "full"), config, params, vocab_rows=official, progress=False)
  assert st_tensors(str(tmp_path / "full"))["model.embed_tokens.weight"].shape == (official, 8)


# ---------------------------------------------------------------------------------------------------------
# Multimodal Gemma 3 and hub-style (legacy) configs

def _make_multimodal(tmp_path, prefix: str, legacy_config: bool) -> str:
  src = os.path.join(FIXTURES, "gemma3")
  text_cfg = json.load(open(os.path.join(src, "config.json")))
  tensors = {prefix + n[len("model."):]: t for n, t in st_tensors(src).items()}
  tensors["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.ones((4, 3), np.float32)
  tensors["model.multi_modal_projector.mm_input_projection_weight"] = np.ones((3, 5), np.float32)
  if legacy_config:  # hub style: rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern
    for k in ("rope_parameters", "layer_types"):
      text_cfg.pop(k)
    text_cfg.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6,
                    rope_scaling={"rope_type": "linear", "factor": 8.0})
  cfg = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text_cfg,
         "vision_config": {"model_type": "siglip_vision_model"}}
  d = tmp_path / "mm"
  d.mkdir()
  json.dump(cfg, open(d / "config.json", "w"))
  from safetensors.numpy import save_file
  save_file(tensors, str(d / "model.safetensors"))
  return str(d)


@pytest.mark.parametrize("prefix,legacy", [("model.language_model.", False), ("language_model.model.", True)])
def test_multimodal_gemma3_reads_the_language_model(prefix, legacy, tmp_path):
  ref = read_hf(os.path.join(FIXTURES, "gemma3"), progress=False)
  mm = read_hf(_make_multimodal(tmp_path, prefix, legacy), progress=False)
  assert mm.config == ref.config
  for a, b in zip(_leaves(ref.params), _leaves(mm.params)):
    np.testing.assert_array_equal(a, b)


HUB_GEMMA3_1B = {  # google/gemma-3-1b-pt config.json (legacy keys)
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144}
HUB_GEMMA3_4B = {  # google/gemma-3-4b-pt (multimodal; the text config leans on HF defaults)
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"model_type": "siglip_vision_model"}}
HUB_GEMMA2_9B = {  # google/gemma-2-9b config.json
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": 50.0,
    "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": 30.0,
    "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584, "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
    "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "torch_dtype": "float32", "vocab_size": 256000}
HUB_GEMMA2_2B_OLD = dict(HUB_GEMMA2_9B, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                         num_hidden_layers=26, num_key_value_heads=4, sliding_window=None,
                         sliding_window_size=4096, final_logit_softcapping=None)  # older key; cap explicitly off
HUB_GEMMA1_2B = {  # google/gemma-2b config.json ("gelu" means the tanh approximation here)
    "architectures": ["GemmaForCausalLM"], "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256,
    "hidden_act": "gelu", "hidden_size": 2048, "intermediate_size": 16384, "max_position_embeddings": 8192,
    "model_type": "gemma", "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
    "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
    "torch_dtype": "bfloat16", "vocab_size": 256000}


@pytest.mark.parametrize("hub,preset,rows", [(HUB_GEMMA3_1B, "gemma3-1b", 262144),
                                             (HUB_GEMMA3_4B, "gemma3-4b", 262208),
                                             (HUB_GEMMA2_9B, "gemma2-9b", 256000),
                                             (HUB_GEMMA1_2B, "gemma1-2b", 256000)])
def test_hub_legacy_configs_map_to_presets(hub, preset, rows):
  c = config_from_hf(hub)
  ref = TransformerConfig.from_preset(preset)
  assert c.preset == preset and c.vocab_size == rows
  assert c.replace(vocab_size=ref.vocab_size, max_seq_len=ref.max_seq_len) == ref


def test_older_gemma2_keys():
  c = config_from_hf(HUB_GEMMA2_2B_OLD)
  assert c.sliding_window_size == 4096 and c.final_logit_soft_cap is None and c.attn_logits_soft_cap == 50.0


def test_new_style_config_equals_legacy():
  legacy = config_from_hf(HUB_GEMMA3_4B)
  new = config_to_hf(legacy)
  assert new["vocab_size"] == 262144  # the multimodal rows go on export
  new["vocab_size"] = legacy.vocab_size
  assert new["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
  assert new["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
  assert config_from_hf(new) == legacy


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file or tensor

def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError) as e:
    read_hf(str(tmp_path / "nope"))
  one_line_error(e, "nope", "does not exist")
  with pytest.raises(CheckpointError) as e:
    read_hf(str(tmp_path))
  one_line_error(e, "no config.json")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError) as e:
    read_hf(str(tmp_path))
  one_line_error(e, "config.json", "invalid JSON")


def test_unsupported_architecture(tmp_path):
  d = tmp_path / "llama"
  d.mkdir()
  json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64}, open(d / "config.json", "w"))
  with pytest.raises(CheckpointError) as e:
    read_hf(str(d))
  one_line_error(e, str(d / "config.json"), "'llama'", "not supported")
  with pytest.raises(CheckpointError) as e:
    config_from_hf(dict(HUB_GEMMA2_9B, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
  one_line_error(e, "yarn")


def test_pickle_weights_refused_never_unpickled(tmp_path):
  d = tmp_path / "pickled"
  d.mkdir()
  shutil.copy(os.path.join(FIXTURES, "gemma2", "config.json"), d / "config.json")
  # A pickle whose loading would create a file: it must never be loaded.
  marker = tmp_path / "unpickled"
  payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
  (d / "pytorch_model.bin").write_bytes(payload)
  with pytest.raises(CheckpointError) as e:
    read_hf(str(d))
  one_line_error(e, "pytorch_model.bin", "safetensors")
  assert not marker.exists()


def _rewrite(d: str, edit):
  """Rewrites model.safetensors after `edit(tensors)` (with safetensors' own writer)."""
  from safetensors.numpy import save_file
  p = os.path.join(d, "model.safetensors")
  t = st_tensors(d)
  edit(t)
  save_file(t, p, metadata={"format": "pt"})


def test_missing_extra_and_misshapen_tensors(tmp_path):
  d = copy_fixture("gemma2", tmp_path)
  name = "model.layers.1.self_attn.k_proj.weight"
  _rewrite(d, lambda t: t.pop(name))
  with pytest.raises(CheckpointError) as e:
    read_hf(d, progress=False)
  one_line_error(e, name, "missing", "model.safetensors")

  d = copy_fixture("gemma3", tmp_path / "b")
  _rewrite(d, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros((64, 32), np.float32)}))
  with pytest.raises(CheckpointError) as e:
    read_hf(d, progress=False)
  one_line_error(e, "model.layers.7.mlp.up_proj.weight", "unexpected")

  d = copy_fixture("gemma1_mqa", tmp_path / "c")
  name = "model.layers.0.mlp.down_proj.weight"
  _rewrite(d, lambda t: t.update({name: t[name][:, :60]}))
  with pytest.raises(CheckpointError) as e:
    read_hf(d, progress=False)
  one_line_error(e, name, "[32, 60]", "[32, 64]")

  d = copy_fixture("gemma1_mqa", tmp_path / "d")  # config contradicts the weights
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["num_key_value_heads"] = 2
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(CheckpointError) as e:
    read_hf(d, progress=False)
  one_line_error(e, "k_proj.weight", "shape")


def test_untied_head_refused(tmp_path):
  d = copy_fixture("gemma2", tmp_path)
  _rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
  with pytest.raises(CheckpointError) as e:
    read_hf(d, progress=False)
  one_line_error(e, "lm_head.weight", "untied")
  d = copy_fixture("gemma2", tmp_path / "tied")  # a saved copy of the tied head is fine
  _rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  read_hf(d, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "bad_header_length"])
def test_corrupt_safetensors(damage, tmp_path):
  d = copy_fixture("gemma3", tmp_path)
  p = os.path.join(d, "model.safetensors")
  data = open(p, "rb").read()
  data = {"truncate": data[:len(data) // 2], "garbage": b"\x00garbage" * 100, "empty": b"",
          "bad_header_length": struct.pack("<Q", 10 ** 12) + data[8:]}[damage]
  open(p, "wb").write(data)
  with pytest.raises(CheckpointError) as e:
    read_hf(d, progress=False)
  one_line_error(e, p, "not a valid safetensors file")


def test_sharded_index_with_missing_shard(tmp_path):
  imp = read_hf(os.path.join(FIXTURES, "gemma2"), progress=False)
  out = tmp_path / "s"
  write_hf(str(out), imp.config, imp.params, progress=False, shard_bytes=60_000)
  os.remove(out / "model-00002-of-00005.safetensors" if (out / "model-00002-of-00005.safetensors").exists()
            else sorted(out.glob("model-00002-*"))[0])
  with pytest.raises(CheckpointError) as e:
    read_hf(str(out), progress=False)
  one_line_error(e, "model.safetensors.index.json", "model-00002-of-", "missing")


def test_index_weight_map_stays_inside_the_directory(tmp_path):
  """A shard named by the index is only read inside the checkpoint directory (an index once named /etc/passwd)."""
  d = copy_fixture("gemma2", tmp_path)
  shutil.copy(os.path.join(d, "model.safetensors"), tmp_path / "outside.safetensors")  # readable: must not be read
  os.symlink(tmp_path / "outside.safetensors", os.path.join(d, "link.safetensors"))
  names = list(st_tensors(d))
  index = os.path.join(d, "model.safetensors.index.json")
  for shard, why in [("/etc/passwd", "is not a relative name inside"), ("../outside.safetensors", "leads outside"),
                     ("link.safetensors", "leads outside")]:
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[3]] = shard
    json.dump({"metadata": {}, "weight_map": weight_map}, open(index, "w"))
    with pytest.raises(CheckpointError) as e:
      read_hf(d, progress=False)
    assert str(e.value) == f"{index}: weight_map: {shard!r} {why} {d}; refusing to follow it"
  json.dump({"weight_map": {names[0]: ["model.safetensors"]}}, open(index, "w"))
  with pytest.raises(CheckpointError) as e:
    read_hf(d, progress=False)
  one_line_error(e, index, "weight_map values must be shard file names")


DEEP = "[" * 100_000 + "]" * 100_000


def test_hostile_json_side_files(tmp_path):
  """config.json, the index and tokenizer_config.json: too deep, a directory, not UTF-8, not an object."""
  from gemma_jax.convert.detect import detect_format
  cases = {"config.json": [(DEEP, "JSON nested too deeply"), (None, "a directory, not a JSON file"),
                           (b'{"model_type": "gemma2\xff"}', "not UTF-8 text"), ("[1, 2]", "expected a JSON object")],
           "model.safetensors.index.json": [(DEEP, "JSON nested too deeply"), ("7", "expected a JSON object")],
           "tokenizer_config.json": [(DEEP, "JSON nested too deeply")]}
  for name, variants in cases.items():
    for i, (text, message) in enumerate(variants):
      d = copy_fixture("gemma2", tmp_path / f"{name}{i}")
      p = os.path.join(d, name)
      if os.path.exists(p):
        os.remove(p)
      if text is None:
        os.mkdir(p)
      else:
        open(p, "wb").write(text if isinstance(text, bytes) else text.encode())
      readers = (read_hf, detect_format) if name == "config.json" else (read_hf,)
      for reader in readers:
        with pytest.raises(CheckpointError) as e:
          reader(d) if reader is detect_format else reader(d, progress=False)
        one_line_error(e, p, message)


BAD_CONFIG_FIELDS = [
    ({"num_hidden_layers": "4"}, "num_hidden_layers must be an integer, got '4'"),
    ({"hidden_size": 64.0}, "hidden_size must be an integer, got 64.0"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number, got '1e-6'"),
    ({"rope_theta": True}, "rope_theta must be a number, got True"),
    ({"final_logit_softcapping": float("nan")}, "final_logit_softcapping must be a number, got nan"),
    ({"sliding_window": "4096"}, "sliding_window must be an integer"),
    ({"layer_types": "sliding_attention"}, "layer_types must be a list of strings"),
    ({"rope_parameters": "default"}, "rope_parameters must be an object"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "8"}}, "rope_scaling.factor must be a number, got '8'"),
    ({"num_hidden_layers": 10 ** 9}, "not a plausible number of layers"),
]


@pytest.mark.parametrize("edit,message", BAD_CONFIG_FIELDS, ids=[m for _, m in BAD_CONFIG_FIELDS])
def test_config_fields_of_the_wrong_type(edit, message):
  with pytest.raises(CheckpointError) as e:
    config_from_hf({**HUB_GEMMA2_9B, **edit}, "x/config.json")
  assert one_line_error(e).startswith("x/config.json: ") and message in str(e.value)


def test_config_fields_of_gemma3_text_and_layer_pattern():
  g3 = {"model_type": "gemma3_text", "num_hidden_layers": 4}
  for cfg, message in [({"model_type": "gemma3", "text_config": [1]}, "text_config must be an object"),
                       ({**g3, "sliding_window_pattern": -6}, "sliding_window_pattern must be >= 1"),
                       ({**g3, "rope_parameters": {"full_attention": "x"}}, "rope_parameters must be an object")]:
    with pytest.raises(CheckpointError) as e:
      config_from_hf(cfg, "x/config.json")
    one_line_error(e, "x/config.json", message)


def test_export_directory_has_mkdirs_permissions(tmp_path):
  """Not tempfile.mkdtemp's private 0o700: 0o777 & ~umask, like mkdir (and like every file in it)."""
  imp = read_hf(os.path.join(FIXTURES, "gemma2"), progress=False)
  old = os.umask(0o022)
  try:
    for umask in (0o022, 0o002):
      os.umask(umask)
      out = tmp_path / f"out{umask:o}"
      write_hf(str(out), imp.config, imp.params, progress=False)
      assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
      assert os.stat(out / "config.json").st_mode & 0o777 == 0o666 & ~umask
  finally:
    os.umask(old)


def test_write_leaves_nothing_partial(tmp_path):
  imp = read_hf(os.path.join(FIXTURES, "gemma2"), progress=False)
  params = {k: v for k, v in imp.params.items() if k != "final_norm"}  # fails at the very last tensor
  with pytest.raises(CheckpointError) as e:
    write_hf(str(tmp_path / "out"), imp.config, params, progress=False)
  one_line_error(e, "final_norm/scale", "missing")
  assert os.listdir(tmp_path) == []
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "x").write_text("x")
  with pytest.raises(CheckpointError) as e:
    write_hf(str(tmp_path / "taken"), imp.config, imp.params, progress=False)
  one_line_error(e, "taken", "already exists")
  assert os.listdir(tmp_path / "taken") == ["x"]


def test_write_checks_parameter_shapes(tmp_path):
  imp = read_hf(os.path.join(FIXTURES, "gemma3"), progress=False)
  imp.params["layer_2"]["mlp"]["linear"] = imp.params["layer_2"]["mlp"]["linear"][:, :-1]
  with pytest.raises(CheckpointError) as e:
    write_hf(str(tmp_path / "out"), imp.config, imp.params, progress=False)
  one_line_error(e, "layer_2/mlp/linear", "[64, 31]", "[64, 32]")
  assert os.listdir(tmp_path) == []


def test_config_hf_cannot_express_is_refused():
  c = tiny_config("gemma1", num_kv_heads=4, query_pre_attn_scalar=20)
  with pytest.raises(CheckpointError) as e:
    config_to_hf(c)
  one_line_error(e, "query_pre_attn_scalar")


# ---------------------------------------------------------------------------------------------------------
# The exported directory loads in transformers. In-process where transformers is installed next to jax;
# otherwise through a separate interpreter named by GEMMA_JAX_HF_PYTHON (e.g. /opt/hfref/bin/python, a venv
# with torch + transformers). Both skip cleanly when neither is available.

_HF_SIDE = r"""
import json, sys, numpy as np, torch, transformers
facts = []
for d, tokens_path, text in json.loads(sys.argv[1]):
  model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
  tokens = np.load(tokens_path)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.save(tokens_path + ".hf.npy", logits)
  tok = transformers.AutoTokenizer.from_pretrained(d)
  gen = transformers.GenerationConfig.from_pretrained(d)
  facts.append({"ids": tok(text)["input_ids"], "eos": gen.eos_token_id, "cls": type(model).__name__,
                "template": tok.chat_template})
print(json.dumps(facts))
"""


def _hf_python() -> str:
  """A python interpreter with torch + transformers, or skip."""
  import sys
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    return sys.executable
  except ImportError:
    python = os.environ.get("GEMMA_JAX_HF_PYTHON")
    if not python:
      pytest.skip("transformers is not installed (set GEMMA_JAX_HF_PYTHON to a python that has it)")
    return python


def _hf_side(jobs: list[tuple[str, np.ndarray, str]], tmp_path) -> list[tuple[np.ndarray, dict]]:
  """Loads each (dir, tokens, text) with transformers, in-process or via GEMMA_JAX_HF_PYTHON, in one
  interpreter: [(logits, facts)]."""
  import subprocess
  python = _hf_python()
  args = []
  for i, (d, tokens, text) in enumerate(jobs):
    path = str(tmp_path / f"tokens{i}.npy")
    np.save(path, tokens)
    args.append((str(d), path, text))
  r = subprocess.run([python, "-c", _HF_SIDE, json.dumps(args)], capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  facts = json.loads(r.stdout.strip().splitlines()[-1])
  return [(np.load(a[1] + ".hf.npy"), f) for a, f in zip(args, facts)]


def test_export_loads_in_transformers(tmp_path, tiny_tokenizer):
  from gemma_jax.model.transformer import Transformer
  _hf_python()
  template = "{{ bos_token }}{{ messages[0]['content'] }}"
  text = "hello world, café <start_of_turn>user"
  jobs, models = [], []
  for name in NAMES:
    imp = read_hf(os.path.join(FIXTURES, name), progress=False)
    out = tmp_path / name
    write_hf(str(out), imp.config, imp.params, tokenizer=tiny_tokenizer, chat_template=template, progress=False)
    tokens = np.load(os.path.join(FIXTURES, name, "inputs.npz"))["tokens"].astype(np.int32)
    jobs.append((out, tokens, text))
    models.append(imp)
  for name, imp, (_, tokens, _), (theirs, facts) in zip(NAMES, models, jobs, _hf_side(jobs, tmp_path)):
    ours, _ = Transformer(imp.config).apply({"params": imp.params}, tokens)
    err = np.abs(np.asarray(ours) - theirs).max()
    print(f"{name}: exported dir in transformers ({facts['cls']}) vs ours: max |diff| = {err:.2e}")
    assert err < 1e-4
    assert facts["ids"] == tiny_tokenizer.encode(text, add_bos=True)
    assert facts["eos"] == [tiny_tokenizer.special.eos, tiny_tokenizer.special.end_of_turn]
    assert facts["template"] == template


def test_real_270m_export_loads_in_transformers(tmp_path, real_gguf_path):
  """GGUF -> ours -> HF dir; transformers' logits on it match ours and the HF-from-GGUF fixture."""
  from gemma_jax.convert.gguf import read_gguf
  from gemma_jax.model.transformer import Transformer
  _hf_python()
  imp = read_gguf(real_gguf_path, progress=False)
  out = tmp_path / "real"
  write_hf(str(out), imp.config, imp.params, tokenizer=imp.tokenizer, chat_template=imp.chat_template,
           progress=False)
  ref = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "real_270m", "logits.npz"))
  tokens = ref["p0_ids"][None].astype(np.int32)
  [(theirs, facts)] = _hf_side([(out, tokens, "The capital of France is")], tmp_path)
  ours, _ = Transformer(imp.config).apply({"params": imp.params}, tokens)
  err = np.abs(np.asarray(ours)[0] - theirs[0]).max()
  fixture_err = np.abs(np.take_along_axis(theirs[0], ref["p0_top_ids"], -1) - ref["p0_top_vals"]).max()
  print(f"real 270M exported: transformers vs ours max |diff| = {err:.2e}; vs HF-from-GGUF fixture "
        f"{fixture_err:.2e}")
  assert err < 1e-4 and fixture_err < 1e-4
  assert facts["ids"] == [2, 818, 5279, 529, 7001, 563]
  assert facts["eos"] == [1, 106]
