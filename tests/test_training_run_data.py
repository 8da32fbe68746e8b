"""The run's data (training/run_data.py): the bound on target tokens per row that the loss's head uses."""

from __future__ import annotations

import numpy as np

from training_helpers import make_workspace, run_config
from gemma_jax.templates import get_template
from gemma_jax.training import run_data


def test_max_targets_bounds_every_row_of_every_batch(tmp_path, tiny_tokenizer):
  ws = make_workspace(tmp_path, tiny_tokenizer)
  for objective in ("orpo", "sft"):
    config = run_config(ws, objective=objective)
    if objective == "sft":  # the preference files as SFT records: prompt + chosen
      import json
      path = tmp_path / "sft.jsonl"
      with open(ws["train"]) as f, open(path, "w") as out:
        for line in f:
          r = json.loads(line)
          out.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n")
      config.data.train, config.data.eval = str(path), ""
    data = run_data.build(config, tiny_tokenizer, get_template("gemma3"), micro_batch=4, process_index=0,
                          process_count=1)
    k = data.max_targets()
    most = 0
    for _, batch in zip(range(60), data.train):  # several epochs of 12 batches: every training row
      most = max(most, int(batch["target_mask"].reshape(-1, batch["target_mask"].shape[-1]).sum(1).max()))
    for batch in data.eval_batches():
      most = max(most, int(batch["target_mask"].reshape(-1, batch["target_mask"].shape[-1]).sum(1).max()))
    assert k % 8 == 0 and most <= k < most + 8, (objective, k, most)
  config.data.packing = True
  packed = run_data.build(config, tiny_tokenizer, get_template("gemma3"), micro_batch=4, process_index=0,
                          process_count=1)
  assert packed.max_targets() is None  # a packed row holds several examples
