"""ORPO on the real Gemma 3 270M (PT) on CPU: the defaults (ORPO, lambda 0.1, cosine, from the real 270M)
sized for a laptop.

    python -m train.train --config=configs/orpo_gemma3_270m_cpu.py --workdir=/tmp/orpo270m \
        --config.data.train=prefs.jsonl --config.data.eval=prefs_test.jsonl

The base model has never seen the chat template; training on it with the "gemma3" template makes the result
an instruction-following ("it"-like) model, and the final checkpoint records that template for the sampler.
"""

from gemma_jax.training.run_config import default_config


def get_config(arg: str | None = None):
  del arg
  c = default_config()
  c.data.template = "gemma3"
  c.data.max_length = 256
  c.batch_size = 4
  c.optim.lr = 5e-6
  c.checkpoint.every = 50
  c.eval.every = 50
  c.eval.max_batches = 8
  c.eval.sample_tokens = 48
  c.log_every = 1
  return c
