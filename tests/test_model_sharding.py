"""Sharding on 8 simulated CPU devices: parameters really split, sharded == unsharded, no host copy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import tiny_config
from gemma_jax.errors import ConfigError
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import count_params, init_params, make_init, param_shapes, param_shardings
from gemma_jax.model.sharding import ShardingContext, make_mesh, parse_mesh_spec
from gemma_jax.model.transformer import Transformer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def test_parse_mesh_spec():
  assert parse_mesh_spec("fsdp:4,tensor:2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert parse_mesh_spec("data:2,fsdp:-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  for bad in ("fsdp:3", "model:8", "fsdp:x", "fsdp:-1,data:-1"):
    with pytest.raises(ConfigError, match="mesh spec"):
      parse_mesh_spec(bad, 8)


def test_rules_split_parameters_and_drop_non_dividing_axes():
  ctx = ShardingContext(make_mesh("fsdp:4,tensor:2"))
  config = TransformerConfig.gemma3_270m()  # one kv head: cannot be split over tensor=2
  shardings = param_shardings(config, ctx)
  layer = shardings["layer_0"]
  assert shardings["embedder"]["input_embedding"].spec == P("tensor", "fsdp")
  assert layer["attn"]["q_einsum"]["w"].spec == P("tensor", "fsdp", None)
  assert layer["attn"]["kv_einsum"]["w"].spec == P(None, None, "fsdp", None)
  assert layer["mlp"]["gating_einsum"].spec == P(None, "tensor", "fsdp")
  assert layer["pre_attention_norm"]["scale"].spec == P(None)


@pytest.mark.parametrize("family,mesh", [("gemma2", "fsdp:4,tensor:2"), ("gemma3", "data:2,fsdp:2,tensor:2"),
                                         ("gemma1", "fsdp:8"), ("gemma4", "data:2,fsdp:2,tensor:2")])
def test_sharded_forward_equals_unsharded(family, mesh):
  config = tiny_config(family, num_heads=4, num_kv_heads=2, embed_dim=64, vocab_size=256)
  ctx = ShardingContext(make_mesh(mesh))
  params = init_params(config, jax.random.key(0), sharding=ctx)
  emb = params["embedder"]["input_embedding"]
  assert len({str(s.index) for s in emb.addressable_shards}) > 1  # really split
  assert emb.addressable_shards[0].data.size < emb.size
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, config.vocab_size)
  batch_sharding = ctx.sharding(("batch", "length"), tokens.shape)
  sharded = jax.jit(lambda p, t: Transformer(config, ctx).apply({"params": p}, t)[0])(
      params, jax.device_put(tokens, batch_sharding))
  host = jax.tree.map(np.asarray, params)
  plain, _ = jax.jit(Transformer(config).apply)({"params": host}, tokens)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), atol=1e-4)


def test_preset_init_on_mesh_builds_only_shards():
  """Compiling a gemma2-2b init over fsdp:8 gives each device 1/8 of the bytes (no full host copy); two of its
  26 layers: each layer is built the same way, and the compile takes a minute less."""
  config = TransformerConfig.gemma2_2b(num_layers=2)
  ctx = ShardingContext(make_mesh("fsdp:8"))
  total = count_params(param_shapes(config)) * 4
  fn = jax.jit(make_init(config), out_shardings=param_shardings(config, ctx))
  compiled = fn.lower(jax.random.key(0)).compile()
  per_device = compiled.memory_analysis().output_size_in_bytes
  assert per_device < total / 8 * 1.05, (per_device, total)


def test_adapters_shard_with_their_weights_and_sharded_equals_unsharded():
  """LoRA adapters take their weight's logical axes (the rank axis replicated); a sharded forward with
  non-zero adapters equals the unsharded one."""
  from gemma_jax.model import lora
  config = tiny_config("gemma3", num_heads=4, num_kv_heads=2, embed_dim=64, vocab_size=256, lora_rank=4)
  ctx = ShardingContext(make_mesh("fsdp:4,tensor:2"))
  shardings = param_shardings(config, ctx)["layer_0"]
  assert shardings["attn"]["q_einsum"]["lora_q_a"].spec == P("fsdp", None)
  assert shardings["attn"]["q_einsum"]["lora_q_b"].spec == P(None, "tensor", None)
  assert shardings["attn"]["attn_vec_einsum"]["lora_o_a"].spec == P("tensor", None, None)
  assert shardings["mlp"]["lora_down_a"].spec == P("tensor", None)
  params = init_params(config, jax.random.key(0), sharding=ctx)
  base, adapters = lora.split(params)
  adapters = jax.tree.map(lambda x: x + 0.3 * jnp.ones_like(x), adapters)  # b off zero, shardings kept
  params = lora.attach(base, adapters)
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, config.vocab_size)
  sharded = jax.jit(lambda p, t: Transformer(config, ctx).apply({"params": p}, t)[0])(
      params, jax.device_put(tokens, ctx.sharding(("batch", "length"), tokens.shape)))
  plain, _ = jax.jit(Transformer(config).apply)({"params": jax.tree.map(np.asarray, params)}, tokens)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), atol=1e-4)
  base_logits, _ = jax.jit(Transformer(config.replace(lora_rank=0)).apply)({"params": jax.tree.map(np.asarray, base)},
                                                                           tokens)
  assert np.abs(np.asarray(plain) - np.asarray(base_logits)).max() > 1e-2
