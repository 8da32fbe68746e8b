"""ORPO / SFT / DPO / SimPO on gemma-2-2b or gemma-3-1b: one recipe, variants chosen by argument.

    python -m train.train --config=configs/finetune.py:objective=dpo,model=gemma3-1b --workdir=/runs/dpo1b \
        --config.init_from=/ckpt/gemma3-1b-it --config.data.train=prefs.jsonl

Arguments (comma-separated key=value): objective = orpo (default) | sft | dpo | simpo; model = gemma2-2b
(default) | gemma3-1b. Hyper-parameters follow each method's reference recipe: ORPO lambda 0.1 (the default),
lr 5e-6 (the ORPO paper's Mistral run, cosine here), 3 epochs; SFT lr 2e-5 with packing; DPO beta 0.1 (the
default), lr 5e-7 (TRL / Zephyr); SimPO beta 2.5, gamma 1.375 (gamma/beta 0.55, the paper's Llama-3 8B base
setting), lr 5e-7. bf16 compute over f32 master weights, sequences of 2048 tokens, remat per block.
"""

from gemma_jax.cli import parse_variants
from gemma_jax.training.run_config import OBJECTIVES, default_config

TEMPLATES = {"gemma2-2b": "gemma", "gemma3-1b": "gemma3"}  # model -> its chat template
CHOICES = {"objective": OBJECTIVES, "model": tuple(TEMPLATES)}
LEARNING_RATES = {"orpo": 5e-6, "sft": 2e-5, "dpo": 5e-7, "simpo": 5e-7}


def get_config(arg: str | None = None):
  a = parse_variants(arg, CHOICES, "configs/finetune.py")
  c = default_config()
  c.init_from = ""  # a gemma_jax checkpoint of the chosen model (required)
  c.objective = a["objective"]
  c.data.template = TEMPLATES[a["model"]]
  c.data.max_length = 2048
  c.batch_size = 32
  c.grad_accum = 4
  c.compute_dtype = "bfloat16"
  c.remat = "block"
  c.optim.lr = LEARNING_RATES[a["objective"]]
  if a["objective"] == "orpo":
    c.num_epochs = 3.0
  elif a["objective"] == "sft":
    c.data.packing = True
  elif a["objective"] == "simpo":
    c.loss.beta = 2.5
    c.loss.gamma = 1.375
  c.checkpoint.every = 200
  c.eval.every = 200
  return c
