"""gemma_jax: Gemma 1/2/3 (text) in JAX/Flax, for preference fine-tuning, sampling and weight conversion."""

__version__ = "0.1.0"

from gemma_jax.errors import UserError
from gemma_jax.model import (AttentionType, ShardingContext, Transformer, TransformerConfig, init_cache,
                             init_params, logits_from_hidden, make_mesh, param_axes, param_shardings,
                             parse_mesh_spec, preset_names)
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.checkpoint import Checkpoint, load, save
