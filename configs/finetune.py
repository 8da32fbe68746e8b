"""ORPO / SFT / DPO / SimPO on gemma-2-2b or gemma-3-1b: one recipe, variants chosen by argument.

    python -m train.train --config=configs/finetune.py:objective=dpo,model=gemma3-1b --workdir=/runs/dpo1b \
        --config.init_from=/ckpt/gemma3-1b-it --config.data.train=prefs.jsonl

Arguments (comma-separated key=value): objective = orpo (default) | sft | dpo | simpo; model = gemma2-2b
(default) | gemma3-1b. Hyper-parameters follow each method's reference recipe: ORPO lambda 0.1, lr 5e-6
(the ORPO paper's Mistral run, cosine here); SFT lr 2e-5; DPO beta 0.1, lr 5e-7 (TRL / Zephyr); SimPO beta
2.5, gamma 1.375 (gamma/beta 0.55, the paper's Llama-3 8B base setting), lr 5e-7. bf16 compute over f32
master weights, sequences of 2048 tokens, remat per block.
"""

from gemma_jax.training.run_config import default_config

MODELS = {"gemma2-2b": "gemma", "gemma3-1b": "gemma3"}  # model -> chat template
OBJECTIVES = ("orpo", "sft", "dpo", "simpo")


def parse_arg(arg: str | None) -> dict[str, str]:
  out = {"objective": "orpo", "model": "gemma2-2b"}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in out:
      raise ValueError(f"configs/finetune.py: bad argument {part!r}; use objective=...,model=...")
    out[key] = value
  if out["objective"] not in OBJECTIVES:
    raise ValueError(f"configs/finetune.py: objective={out['objective']!r}; use one of {', '.join(OBJECTIVES)}")
  if out["model"] not in MODELS:
    raise ValueError(f"configs/finetune.py: model={out['model']!r}; use one of {', '.join(MODELS)}")
  return out


def get_config(arg: str | None = None):
  a = parse_arg(arg)
  c = default_config()
  c.init_from = ""  # a gemma_jax checkpoint of the chosen model (required)
  c.objective = a["objective"]
  c.data.template = MODELS[a["model"]]
  c.data.max_length = 2048
  c.batch_size = 32
  c.grad_accum = 4
  c.num_epochs = 1.0 if a["objective"] != "orpo" else 3.0
  c.optim.schedule = "cosine"
  c.optim.warmup = 0.1
  c.compute_dtype = "bfloat16"
  c.remat = "block"
  if a["objective"] == "orpo":
    c.loss.orpo_lambda = 0.1
    c.optim.lr = 5e-6
  elif a["objective"] == "sft":
    c.optim.lr = 2e-5
    c.data.packing = True
  elif a["objective"] == "dpo":
    c.loss.beta = 0.1
    c.optim.lr = 5e-7
  else:
    c.loss.beta = 2.5
    c.loss.gamma = 1.375
    c.optim.lr = 5e-7
  c.checkpoint.every = 200
  c.eval.every = 200
  return c
