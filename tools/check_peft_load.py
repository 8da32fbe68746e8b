"""The consumer's check of a peft export: HF transformers + peft load our base and adapters and give our logits.

    # in gemma_jax's venv: the base as HF, the adapters as peft, and our logits on tokens [2, 4..39]
    python -m gemma_jax.convert --src=BASE --dst=/tmp/hf --dst_format=hf
    python -m gemma_jax.convert --src=ADAPTERS --dst=/tmp/peft --dst_format=peft
    # in the reference venv (torch, transformers, peft):
    /opt/hfref/bin/python tools/check_peft_load.py /tmp/hf /tmp/peft OUR_LOGITS.npy

Prints the largest |peft - ours| and exits 1 above 1e-4.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(hf_dir: str, peft_dir: str, logits_path: str) -> int:
  model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
  model = PeftModel.from_pretrained(model, peft_dir)
  model.eval()
  ours = np.load(logits_path)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor([[2] + list(range(4, 40))])).logits.float().numpy()
  err = float(np.abs(theirs[..., :ours.shape[-1]] - ours).max())
  print(f"peft loaded {peft_dir} onto {hf_dir}: max |peft - ours| = {err:.3g}")
  return 0 if err <= 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:4]))
