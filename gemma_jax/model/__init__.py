"""The Gemma model: config and presets, layers, transformer, KV cache, sharding rules."""

from gemma_jax.model.config import AttentionType, TransformerConfig, preset_names
from gemma_jax.model.kv_cache import init_cache
from gemma_jax.model.sharding import ShardingContext, make_mesh, parse_mesh_spec
from gemma_jax.model.transformer import Transformer, logits_from_hidden
from gemma_jax.model.params import init_params, param_axes, param_shardings
