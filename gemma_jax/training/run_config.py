"""The run config: every field `train(config, workdir)` reads, with its default and meaning.

Recipes in `configs/` start from `default_config()` and change what they need; any field can be overridden
from the command line: `python -m train.train --config=configs/orpo.py:gemma2_2b --config.optim.lr=1e-6`.
"""

from __future__ import annotations

import ml_collections

OBJECTIVES = ("orpo", "sft", "dpo", "simpo")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- what to train ---------------------------------------------------------------------------------------
  # A gemma_jax checkpoint directory (convert HF / GGUF / Flax weights first), "real:gemma3-270m" (the real
  # Gemma 3 270M PT model shipped with the package), or a preset name ("gemma3-1b") for a random init.
  c.init_from = "real:gemma3-270m"
  c.model_overrides = ml_collections.ConfigDict()  # TransformerConfig fields, e.g. num_layers (random init only)
  c.tokenizer = ""  # SentencePiece model; default: the checkpoint's
  c.compute_dtype = "float32"  # "bfloat16": bf16 matmuls over f32 master weights
  c.param_dtype = "float32"  # the master weights (and the optimizer moments)
  c.remat = "none"  # "block": recompute each block in the backward pass; "dots": keep matmul outputs only

  c.objective = "orpo"  # one of OBJECTIVES
  c.loss = ml_collections.ConfigDict()
  c.loss.orpo_lambda = 0.1  # ORPO: weight of the odds-ratio term (TRL's `beta`)
  c.loss.nll_target = "sequence"  # ORPO NLL over the chosen row: "sequence" (prompt + response, TRL) or "response"
  c.loss.beta = 0.1  # DPO (TRL default 0.1) / SimPO (the paper uses 2.0-10)
  c.loss.gamma = 0.5  # SimPO target margin (absolute gamma = the paper's gamma/beta ratio times beta)
  c.loss.label_smoothing = 0.0  # DPO / SimPO; 0 = the plain sigmoid loss
  c.loss.chunk_size = 0  # positions per log-prob chunk; 0 = sized to keep one f32 logits chunk ~256 MB
  # Keep every position's f32 logits for the backward pass when they fit this many MiB (global shapes of one
  # microbatch): faster (no recomputed head), more memory. 0 = always recompute them chunk by chunk.
  c.loss.saved_logits_mib = 1536

  # --- data ------------------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # JSONL / JSON / Parquet file (or comma-separated files)
  c.data.eval = ""  # held-out file; "" = none (or use eval_fraction)
  c.data.eval_fraction = 0.0  # hold out this fraction of `train` when `eval` is ""
  c.data.template = ""  # chat template name; default: the checkpoint's, else the family's
  c.data.max_length = 1024  # tokens per row (prompt + response)
  c.data.shuffle = True
  c.data.packing = False  # SFT only: pack several examples per row

  # --- schedule and optimizer ------------------------------------------------------------------------------
  c.batch_size = 8  # examples (pairs, for preference objectives) per optimizer step, over all hosts
  c.grad_accum = 1  # microbatches per step; batch_size must divide by it
  c.num_epochs = 1.0  # used when num_steps is 0
  c.num_steps = 0  # 0: num_epochs over the training set
  c.seed = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-5
  c.optim.schedule = "cosine"  # cosine | linear | inverse_sqrt | constant
  c.optim.warmup = 0.1  # < 1: fraction of the steps; >= 1: steps
  c.optim.min_lr_ratio = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0  # <= 0: no clipping
  c.optim.decay_norms_and_embeddings = False

  # --- devices ---------------------------------------------------------------------------------------------
  c.mesh = "fsdp:-1"  # axes data, fsdp, tensor; e.g. "data:2,fsdp:4" or "fsdp:-1,tensor:2"

  # --- checkpoints, evaluation, logging --------------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500  # steps between run checkpoints (also written on SIGTERM / SIGINT)
  c.checkpoint.keep = 3  # run checkpoints kept (the latest ones)
  c.checkpoint.async_save = True
  c.checkpoint.keep_best = True  # also write <workdir>/best (our format) when the eval loss improves

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 500  # steps between evaluations (and at the end); 0 = only at the end
  c.eval.max_batches = 0  # 0 = the whole held-out set
  c.eval.num_samples = 2  # greedy samples from held-out prompts, logged with the eval metrics
  c.eval.sample_tokens = 64

  c.log_every = 10  # steps between metric lines (metrics.jsonl, TensorBoard)
  c.progress = True  # progress bar (loss, tokens/s, ETA)
  c.max_nonfinite = 20  # stop after this many non-finite steps in a row
  c.inject_nonfinite = ""  # testing only: comma-separated steps whose loss is made NaN ("" = none)
  return c
