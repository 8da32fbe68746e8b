"""Checkpoint converters: HF safetensors, the official Flax checkpoints, GGUF, to and from our format.

`python -m gemma_jax.convert --src=PATH --dst=PATH [--dst_format=native|hf] [--dtype=...]`
"""
