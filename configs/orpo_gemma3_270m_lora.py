"""ORPO with LoRA adapters on the real Gemma 3 270M (PT) on CPU: configs/orpo_gemma3_270m_cpu.py with rank-16
adapters on every projection (lora.targets defaults to all-linear; the base frozen, in bf16), so only ~3.8M
parameters train and the run checkpoints hold the adapters alone.

    python -m train.train --config=configs/orpo_gemma3_270m_lora.py --workdir=/tmp/lora \
        --config.data.train=prefs.jsonl --config.data.eval=prefs_test.jsonl

Only what differs from configs/orpo_gemma3_270m_cpu.py is set here.
"""

from configs.orpo_gemma3_270m_cpu import get_config as base_config


def get_config(arg: str | None = None):
  c = base_config(arg)
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.param_dtype = "bfloat16"  # the frozen base (adapters are f32 whatever this says)
  c.optim.lr = 2e-4  # adapters take a ~10x higher rate than full fine-tuning (the demo's sweep: 2e-4)
  return c
