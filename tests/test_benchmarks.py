"""The GPU benchmarks and the packed-kernel benchmark stay runnable on CPU (`--tiny`), and the GPU ones' FLOP
count agrees with XLA's."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from gemma_jax.model import TransformerConfig, init_params
from gemma_jax.model.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_orpo_gpu_model_flops_match_xla_cost_analysis():
  """At one token (one attended key) XLA's count is the matmuls plus a little elementwise work."""
  orpo_gpu = _load("orpo_gpu")
  config = TransformerConfig.gemma2_2b(num_layers=2, embed_dim=256, hidden_dim=1024, num_heads=4, num_kv_heads=2,
                                       head_dim=64, vocab_size=2048, query_pre_attn_scalar=64)
  params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  forward = jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t)[0])
  cost = forward.lower(params, jax.ShapeDtypeStruct((1, 1), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ours = orpo_gpu.forward_flops_per_row(config, 1)
  assert 1.0 <= cost["flops"] / ours < 1.02, (cost["flops"], ours)


def test_orpo_gpu_attention_flops_count_only_attended_keys():
  orpo_gpu = _load("orpo_gpu")
  base = dict(num_layers=2, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512,
              query_pre_attn_scalar=16)
  narrow = TransformerConfig.gemma2_2b(sliding_window_size=8, **base)  # layer 0 local, layer 1 global
  wide = TransformerConfig.gemma2_2b(sliding_window_size=4096, **base)
  t = 64
  saved = orpo_gpu.forward_flops_per_row(wide, t) - orpo_gpu.forward_flops_per_row(narrow, t)
  keys_full, keys_window = t * (t + 1) // 2, sum(min(i + 1, 8) for i in range(t))
  assert saved == 4 * 4 * 16 * (keys_full - keys_window)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["orpo_gpu", "decode_gpu"])
def test_gpu_benchmarks_run_tiny_on_cpu(name, capsys):
  args = ["--tiny", "--batch_sizes=1,2"] + (["--steps=1"] if name == "orpo_gpu" else [])
  assert _load(name).main(args) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  if name == "orpo_gpu":
    assert report["largest_batch_that_fits"] == 2 and 0 < report["runs"]["1"]["mfu"] < 1
  else:
    assert report["1"]["decode_tok_s"] > 0 and report["2"]["decode_tok_s"] > 0


def test_packed_matmul_benchmark_runs_tiny(capsys):
  from gemma_jax.kernels import packed_matmul
  if not packed_matmul.available():
    pytest.skip("no C++ compiler: packed kernel not built")
  assert _load("packed_matmul_cpu").main(["--tiny", "--repeats=2"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["decode"]["tiny"]["packed_gb_s"] > 0 and report["prefill"]["tiny prefill"]["packed_gflop_s"] > 0


def test_gguf_read_benchmark_runs_tiny(tmp_path, capsys, tiny_tokenizer_proto):
  from helpers import tiny_config
  from test_convert_gguf import write_gemma_gguf
  config = tiny_config("gemma3", vocab_size=300)
  path = str(tmp_path / "m.gguf")
  write_gemma_gguf(path, config, jax.device_get(init_params(config, jax.random.key(0))), tiny_tokenizer_proto)
  assert _load("gguf_read").main([f"--gguf={path}", "--repeats=1"]) == 0
  assert "ratio" in capsys.readouterr().out
