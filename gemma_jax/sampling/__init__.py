"""Sampling: prefill + jitted decode loop with a KV cache, strategies, stop rules, streaming, chat."""

from gemma_jax.sampling.engine import Completion, Sampler, Stream
from gemma_jax.sampling.program import DecodeState
from gemma_jax.sampling.stopping import StopRules, default_stop_ids
from gemma_jax.sampling.streaming import IncrementalDecoder
from gemma_jax.sampling.strategies import SamplingParams
