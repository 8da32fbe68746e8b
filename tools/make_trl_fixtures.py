"""Builds the TRL ORPO parity fixtures: tiny random HF Gemma models and TRL's loss, metrics and gradients.

Regenerate (needs the reference venv with torch + transformers + trl; gemma_jax itself never imports them):

    /opt/hfref/bin/python tools/make_trl_fixtures.py              # every model
    /opt/hfref/bin/python tools/make_trl_fixtures.py gemma4       # only these (the others stay as they are)

Outputs, in tests/fixtures/trl/<name>/ for name in gemma2 (attention and final soft-caps that bite, GQA,
sliding window shorter than the rows), gemma3 (QK-norm, 5 local + 1 global layers), gemma4 (dense: global
layers with their own head dim, K = V and proportional RoPE, value norm, layer scalars) and gemma3_lora (the
gemma3 model under peft LoRA adapters on every projection, seeded non-zero; TRL trains the adapters only):
  config.json, model.safetensors   the random HF model (f32, seeded), as `save_pretrained` writes it
  batch.npz                        the collated batch exactly as TRL's ORPOTrainer receives it:
                                   {chosen,rejected}_{input_ids,attention_mask,labels} [B, T_*] int64
  reference.npz                    loss (scalar), metric/<name> for every TRL metric, grad/<hf name> for
                                   every trained parameter (f32), and beta; gemma3_lora: logits [1, 37, V]
                                   of the peft model on tokens [2, 4..39] too
  adapter/ (gemma3_lora)           the adapters as peft's save_pretrained writes them
  lora_config_fields.json          (gemma3_lora) the fields peft's LoraConfig accepts

The path through TRL is the trainer's own: an `ORPOTrainer` built on a text dataset and a word-level tokenizer
(one word per token id, so the token ids are chosen here), its `tokenize_row` (BOS / EOS handling, prompt
labels -100), its `DPODataCollatorWithPadding`, then `get_batch_loss_metrics` (the function `compute_loss`
calls) and `loss.backward()`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "trl")

VOCAB = 128
BETA = 0.25  # not TRL's default 0.1, so the test proves beta is applied where TRL applies it
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=16, max_position_embeddings=128,
              rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)

# (prompt, chosen, rejected) as token ids (4..VOCAB-1); BOS and EOS are added by TRL's tokenize_row. Lengths
# differ within and across pairs so both halves get right padding and the longest row is a rejected one.
PAIRS = [
    ([5, 9, 11, 40, 7], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 41, 42, 43]),
    ([50, 51, 52, 53, 54, 55, 56, 57, 58], [60, 61, 62, 63, 64, 65, 66, 67], [70, 71]),
    ([80, 81], [90, 91, 92, 93, 94], [100, 101, 102, 103, 104, 105, 106]),
]


def specs():
  from transformers import Gemma2Config, Gemma3TextConfig, Gemma4TextConfig
  return {
      "gemma4": Gemma4TextConfig(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
                                 sliding_window=6, global_head_dim=32, attention_k_eq_v=True,
                                 num_global_key_value_heads=1, final_logit_softcapping=4.0,
                                 hidden_activation="gelu_pytorch_tanh", hidden_size_per_layer_input=0,
                                 vocab_size_per_layer_input=VOCAB, **COMMON),
      "gemma2": Gemma2Config(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=2.0,
                             final_logit_softcapping=4.0, hidden_activation="gelu_pytorch_tanh",
                             rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, **COMMON),
      "gemma3": Gemma3TextConfig(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
                                 query_pre_attn_scalar=20, sliding_window=6, hidden_activation="gelu_pytorch_tanh",
                                 rope_parameters={
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1_000_000.0}},
                                 **COMMON),
  }


def init_weights(model, seed: int) -> None:
  """O(1) activations (HF's std 0.02 init makes every log-prob ~ -log V): linear ~ 1/sqrt(fan_in), q/k x1.5,
  embedding std 0.5, norm scales N(0, 0.3) (Gemma 4, whose norms multiply by the weight: 1 + N(0, 0.3));
  Gemma 4's layer scalars (buffers) U(0.5, 1.5)."""
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
        w = rng.normal(0.0, 0.5, p.shape)
      else:
        gain = 1.5 if ("q_proj" in name or "k_proj" in name) else 1.0
        w = rng.normal(0.0, gain / np.sqrt(p.shape[1]), p.shape)
      p.copy_(torch.from_numpy(w.astype(np.float32)))


def word_tokenizer():
  """A fast tokenizer with one whitespace-separated word per id: 'w17' -> 17; <pad> 0, <eos> 1, <bos> 2."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
  vocab.update({f"w{i}": i for i in range(4, VOCAB)})
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                 unk_token="<unk>")


def words(ids) -> str:
  return " ".join(f"w{i}" for i in ids)


def trl_reference(model, pairs, beta: float, workdir: str, max_length: int = 64):
  """Runs TRL's ORPOTrainer path on `pairs`; returns (collated batch, loss, metrics, grads by HF name)."""
  from datasets import Dataset
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

  data = Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
                            for p, c, r in pairs])
  args = ORPOConfig(output_dir=workdir, beta=beta, max_length=max_length, per_device_train_batch_size=len(pairs),
                    report_to="none", use_cpu=True, remove_unused_columns=False, seed=0, save_strategy="no")
  trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer())
  features = [trainer.train_dataset[i] for i in range(len(pairs))]
  batch = trainer.data_collator(features)
  model.train()
  model.zero_grad()
  loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="train")
  loss.backward()
  grads = {n: p.grad.detach().float().numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
  keep = {k: v.numpy() for k, v in batch.items()
          if isinstance(v, torch.Tensor) and k.startswith(("chosen_", "rejected_"))}
  return keep, float(loss.detach()), metrics, grads


LORA = dict(r=4, lora_alpha=12.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def with_lora(model, seed: int):
  """The model under peft LoRA adapters (LORA) with seeded a and b: b ~ N(0, 0.2) (not peft's zeros, so every
  adapter gradient and the adapters' effect on the logits are non-trivial)."""
  from peft import LoraConfig, get_peft_model
  peft_model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_A" in name:
        p.copy_(torch.from_numpy(rng.uniform(-1, 1, p.shape).astype(np.float32) / np.sqrt(p.shape[1])))
      elif "lora_B" in name:
        p.copy_(torch.from_numpy(rng.normal(0.0, 0.2, p.shape).astype(np.float32)))
  return peft_model


def main(only: list[str]) -> None:
  from transformers import AutoModelForCausalLM
  import transformers
  import trl

  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  tmp = OUT + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  seeds = {"gemma2": 0, "gemma3": 1, "gemma4": 2, "gemma3_lora": 1}  # the seeds the committed fixtures used
  all_specs = {**specs(), "gemma3_lora": specs()["gemma3"]}
  for name, cfg in all_specs.items():
    if only and name not in only:
      continue
    seed = seeds[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    init_weights(model, 3000 + seed)
    d = os.path.join(tmp, name)
    model.save_pretrained(d, safe_serialization=True)
    extra = {}
    if name.endswith("_lora"):  # TRL + peft: the adapters train, the base is frozen
      model = with_lora(model, 4000 + seed)
      model.save_pretrained(os.path.join(d, "adapter"), safe_serialization=True)
      os.remove(os.path.join(d, "adapter", "README.md"))  # peft's model-card stub
      model.eval()
      with torch.no_grad():
        extra["logits"] = model(input_ids=torch.tensor([[2] + list(range(4, 40))])).logits.float().numpy()
      import peft
      from peft import LoraConfig
      with open(os.path.join(d, "lora_config_fields.json"), "w") as f:
        json.dump({"peft": peft.__version__, "fields": sorted(LoraConfig.__dataclass_fields__)}, f, indent=1)
    with tempfile.TemporaryDirectory() as work:
      batch, loss, metrics, grads = trl_reference(model, PAIRS, BETA, work)
    np.savez_compressed(os.path.join(d, "batch.npz"), **batch)
    ref = {"loss": np.float32(loss), "beta": np.float32(BETA), **extra}
    ref.update({f"metric/{k}": np.float32(v) for k, v in metrics.items()})
    ref.update({f"grad/{k}": v.astype(np.float32) for k, v in grads.items()})
    np.savez_compressed(os.path.join(d, "reference.npz"), **ref)
    with open(os.path.join(d, "versions.json"), "w") as f:
      json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                 "attn_implementation": "eager", "dtype": "float32"}, f, indent=1)
    shapes = {k: v.shape for k, v in batch.items()}
    print(f"[trl] {name}: loss {loss:.6f} batch {shapes}", flush=True)
    print("      " + ", ".join(f"{k}={v:.5f}" for k, v in metrics.items()), flush=True)
  from make_hf_fixtures import install  # tools/ is this script's directory: on sys.path
  install(tmp, OUT, replace_all=not only)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
