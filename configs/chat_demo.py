"""The main job's recipe: ORPO from the real Gemma 3 270M base model (PT) to a chat model, on the bundled demo
pairs (data/demo), sized for a 2-core CPU. The hyper-parameters come from the sweep recorded in BENCHMARKS.md.

    python -m train.demo                                            # = bash scripts/run.sh
    python -m train.demo --config.num_steps=60 --config.optim.lr=3e-5 --workdir=/tmp/demo2

Only what differs from the defaults is set here.
"""

import os

from gemma_jax.training.run_config import default_config

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo")


def get_config(arg: str | None = None):
  del arg
  c = default_config()
  c.data.train = os.path.join(DATA, "train.jsonl")
  c.data.eval = os.path.join(DATA, "eval.jsonl")
  c.data.template = "gemma3"  # the chat template trained into the base model, saved with the result
  c.data.max_length = 96  # 3 of the 976 training pairs are longer (dropped, counted)
  c.batch_size = 4
  c.num_steps = 24
  c.optim.lr = 5e-5
  c.compute_dtype = "bfloat16"  # bf16 matmuls over f32 master weights: 1.27x faster on CPU (BENCHMARKS.md)
  c.loss.orpo_lambda = 0.5  # a stronger odds-ratio term kept more facts than 0.1 (the sweep)
  # Attention (and norms) only: the MLPs, where most facts live, and the 262144-row table stay as they are;
  # then final/ = base + 0.7 (trained - base). The sweep: 25.1% held-out accuracy for full fine-tuning, 25.7%
  # attention-only, 30.5% merged at 0.7 (= the base model's few-shot), stop rate 98%.
  c.optim.freeze = "embedder,mlp"
  c.merge_alpha = 0.7
  c.loss.nll_target = "response"  # the NLL term on the answers only (the ORPO paper's SFT term), not the questions
  c.loss.saved_logits_mib = 2048  # keep the [8, 96, 262144] f32 logits: no recomputed head in the backward
  c.eval.every = 0  # evaluated at the start and the end (and the merged model): each evaluation costs ~45 s
  c.eval.at_start = True  # the base model's preference accuracy and stop rate, as step 0
  c.eval.max_batches = 8  # 32 held-out pairs per evaluation
  c.eval.num_samples = 16
  c.eval.sample_tokens = 32
  c.checkpoint.keep_best = False  # final/ is the model
  c.log_every = 1
  return c
