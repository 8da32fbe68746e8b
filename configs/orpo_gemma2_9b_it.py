"""ORPO of gemma-2-9b-it in the style of Gemma-2-9B-Chinese-Chat (LLaMA-Factory's ORPO recipe).

lambda 0.05, lr 3e-6, cosine with 10% warmup (the default schedule), 2 epochs, global batch 128 pairs, sequences of 8192 tokens,
bf16 compute over f32 master weights, every block rematerialized. Convert the HF weights first:

    python -m gemma_jax.convert --src=/path/to/gemma-2-9b-it --dst=/ckpt/gemma2-9b-it
    python -m train.train --config=configs/orpo_gemma2_9b_it.py --workdir=/runs/orpo9b \
        --config.init_from=/ckpt/gemma2-9b-it --config.data.train=prefs.jsonl --config.data.eval=test.jsonl

On a pod, run the same command on every host (see train/train.py for the multi-host flags); `mesh` shards
parameters and optimizer state over all devices (FSDP); add `tensor:N` for tensor parallelism.
"""

from gemma_jax.training.run_config import default_config


def get_config(arg: str | None = None):
  del arg
  c = default_config()
  c.init_from = ""  # a gemma_jax checkpoint of gemma-2-9b-it (required)
  c.loss.orpo_lambda = 0.05
  c.data.template = "gemma"
  c.data.max_length = 8192
  c.batch_size = 128
  c.grad_accum = 16
  c.num_epochs = 2.0
  c.optim.lr = 3e-6
  c.compute_dtype = "bfloat16"
  c.remat = "block"
  c.checkpoint.every = 200
  c.checkpoint.keep = 2
  c.eval.every = 200
  c.eval.num_samples = 4
  c.eval.sample_tokens = 256
  return c
