"""The run config: every field `train(config, workdir)` reads, with its default and meaning.

Recipes in `configs/` start from `default_config()` and change what they need; any field can be overridden
from the command line: `python -m train.train --config=configs/finetune.py:objective=orpo,model=gemma2-2b
--config.optim.lr=1e-6`.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import ml_collections
from ml_collections import config_dict

from gemma_jax.data.batching import NLL_TARGETS
from gemma_jax.errors import ConfigError
from gemma_jax.model.config import DTYPES, REMAT, TransformerConfig
from gemma_jax.training import objectives
from gemma_jax.training.optim import SCHEDULES

OBJECTIVES = objectives.NAMES


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- what to train ---------------------------------------------------------------------------------------
  # A gemma_jax checkpoint directory (convert HF / GGUF / Flax weights first), "real:gemma3-270m" (the real
  # Gemma 3 270M PT model shipped with the package), or a preset name ("gemma3-1b") for a random init.
  c.init_from = "real:gemma3-270m"
  # TransformerConfig fields to change, e.g. --config.model_overrides.num_layers=2 (None = keep). Fields that
  # change parameter shapes apply to a random init only; a checkpoint start refuses them.
  c.model_overrides = model_override_fields()
  c.tokenizer = ""  # SentencePiece model; default: the checkpoint's
  c.compute_dtype = "float32"  # "bfloat16": bf16 matmuls over f32 master weights
  c.param_dtype = "float32"  # the master weights (and the optimizer moments)
  c.remat = "none"  # "block": recompute each block in the backward pass; "dots": keep matmul outputs only

  c.objective = "orpo"  # one of OBJECTIVES (the table in objectives.py)
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
  c.data.skip_invalid = False  # drop malformed records (counted and reported) instead of stopping
  # Stop before training when more than this fraction of the records is dropped (too long for max_length,
  # or malformed and skipped): 0.1 = at most 10%. 1.0 = never stop.
  c.data.max_dropped_fraction = 0.1

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
  # Parameters that do not train: comma-separated regular expressions searched in paths like
  # "embedder/input_embedding" or "layer_3/mlp/linear" (e.g. "embedder" keeps the 262144-row table as it is).
  c.optim.freeze = ""

  # --- low-rank adapters (LoRA, as HF peft; gemma_jax/model/lora.py) ----------------------------------------
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # > 0: train adapters of this rank only; the base stays frozen (no gradient, no Adam moments)
  c.lora.alpha = 16.0  # the adapters' outputs times alpha / rank (alpha / sqrt(rank) with rslora)
  c.lora.rslora = False
  # Projections with adapters: q, k, v, o, gate, up, down (peft's q_proj, ... and all-linear too),
  # comma-separated, or "layer_<i>/<name>" regexes ("layer_1[0-7]/(q|v)").
  c.lora.targets = "all-linear"

  # --- devices ---------------------------------------------------------------------------------------------
  c.mesh = "fsdp:-1"  # axes data, fsdp, tensor; e.g. "data:2,fsdp:4" or "fsdp:-1,tensor:2"

  # --- checkpoints, evaluation, logging --------------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500  # steps between run checkpoints (also written on SIGTERM / SIGINT)
  c.checkpoint.keep = 1  # run checkpoints kept (the latest ones); each holds params + 2 Adam moments (3x params)
  c.checkpoint.async_save = True
  c.checkpoint.keep_best = True  # also write <workdir>/best (our format) when the eval loss improves
  c.checkpoint.verify = True  # check every tensor's checksum when restoring (False: faster, unchecked)
  # Resume from this run checkpoint step instead of the latest (-1); later steps are moved aside, not deleted.
  c.checkpoint.resume_step = -1

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 500  # steps between evaluations (and at the end); 0 = only at the end
  c.eval.at_start = False  # also evaluate the starting model, as step 0 (TRL's eval_on_start)
  c.eval.max_batches = 0  # 0 = the whole held-out set
  c.eval.num_samples = 2  # greedy samples from held-out prompts, logged with the eval metrics
  c.eval.sample_tokens = 64

  c.log_every = 10  # steps between metric lines (metrics.jsonl, TensorBoard)
  c.progress = True  # progress bar (loss, tokens/s, ETA)
  c.max_nonfinite = 20  # stop after this many non-finite steps in a row
  # A run in which more than this fraction of the steps was skipped (non-finite) ends with an error and no
  # final/ model; the run checkpoints stay.
  c.max_skipped_fraction = 0.5
  # final/ = start + merge_alpha * (trained - start): the trained weights interpolated toward the starting
  # model's (weight-space ensembling, as WiSE-FT), which keeps more of what the start knew. 1.0 = the trained
  # weights as they are. The run checkpoints and best/ always hold the trained weights.
  c.merge_alpha = 1.0
  return c


# ---------------------------------------------------------------------------------------------------------
# Model overrides


RUN_LEVEL = ("dtype", "param_dtype", "remat", "preset")  # set by compute_dtype, param_dtype, remat instead
LORA_FIELDS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_rslora": "rslora", "lora_targets": "targets"}


def model_override_fields() -> ml_collections.ConfigDict:
  """One typed placeholder (None) per scalar TransformerConfig field, so `--config.model_overrides.X=v` parses."""
  hints = typing.get_type_hints(TransformerConfig)
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(TransformerConfig):
    if f.name in RUN_LEVEL or f.name in LORA_FIELDS:
      continue
    kind = _scalar_type(hints[f.name])
    if kind is not None:
      c[f.name] = config_dict.placeholder(kind)
  return c


def _scalar_type(hint) -> type | None:
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if hint in (int, float, bool, str):
    return hint
  if typing.get_origin(hint) is typing.Literal:
    return str
  if len(args) == 1 and args[0] in (int, float, bool, str):
    return args[0]
  return None


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """The model_overrides that are set (not None), as a plain dict."""
  overrides = config.model_overrides
  if not isinstance(overrides, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f"model_overrides={overrides!r}: set single fields, e.g. --config.model_overrides.num_layers=2")
  known = {f.name for f in dataclasses.fields(TransformerConfig)}
  out = {}
  for k, v in dict(overrides).items():
    if k in LORA_FIELDS:
      raise ConfigError(f"model_overrides.{k}: set --config.lora.{LORA_FIELDS[k]} instead")
    if k not in known or k in RUN_LEVEL:
      raise ConfigError(f"model_overrides.{k}: not a model field that can be overridden"
                        + (f" (set --config.{'compute_dtype' if k == 'dtype' else k} instead)" if k in RUN_LEVEL[:3]
                           else ""))
    if v is not None:
      out[k] = v
  return out


# ---------------------------------------------------------------------------------------------------------
# Validation: the whole run config, before any work


MAX_SEED = 2**31 - 1


def validate_run_config(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that cannot work, before any file is read or written."""

  def need(ok: bool, field: str, why: str) -> None:
    if not ok:
      node = c
      for part in field.split("."):
        node = node[part] if isinstance(node, (dict, ml_collections.ConfigDict)) and part in node else None
      raise ConfigError(f"config field {field}={node!r}: {why}")

  def integer(field: str, lo: int, hi: int | None = None) -> None:
    v = _get(c, field)
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    need(ok, field, f"must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))

  def number(field: str, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
    v = _get(c, field)
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi))
    need(ok, field, f"must be a finite number {'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None
                                                                               else ""))

  def choice(field: str, options) -> None:
    need(_get(c, field) in options, field, f"use one of {', '.join(options)}")

  def string(field: str) -> None:
    need(isinstance(_get(c, field), str), field, "must be a string")

  choice("objective", OBJECTIVES)
  for f in ("init_from", "tokenizer", "data.train", "data.eval", "data.template", "mesh"):
    string(f)
  choice("compute_dtype", DTYPES)
  choice("param_dtype", DTYPES)
  choice("remat", REMAT)
  model_overrides(c)
  for f in ("loss.orpo_lambda", "loss.beta"):
    number(f, 0.0, lo_open=True)
  number("loss.gamma", -1e9)
  number("loss.label_smoothing", 0.0, 0.5)
  choice("loss.nll_target", NLL_TARGETS)
  integer("loss.chunk_size", 0)
  integer("loss.saved_logits_mib", 0)

  number("data.eval_fraction", 0.0, 1.0)
  need(c.data.eval_fraction < 1.0, "data.eval_fraction", "must be < 1 (some data must stay for training)")
  integer("data.max_length", 2)
  number("data.max_dropped_fraction", 0.0, 1.0)
  for f in ("data.shuffle", "data.packing", "data.skip_invalid", "checkpoint.async_save", "checkpoint.keep_best",
            "checkpoint.verify", "progress"):
    need(isinstance(_get(c, f), bool), f, "must be true or false")
  need(not c.data.packing or objectives.get(c.objective).data_kind == "sft", "data.packing",
       "is for the sft objective only")

  integer("batch_size", 1)
  integer("grad_accum", 1)
  need(c.batch_size % c.grad_accum == 0, "batch_size", f"must be a multiple of grad_accum={c.grad_accum}")
  number("num_epochs", 0.0, lo_open=True)
  integer("num_steps", 0)
  need(c.num_steps > 0 or not c.data.packing, "num_steps", "must be set (> 0) with data.packing: the batches per "
       "epoch are not known in advance")
  integer("seed", 0, MAX_SEED)

  number("optim.lr", 0.0)
  choice("optim.schedule", SCHEDULES)
  number("optim.warmup", 0.0)
  number("optim.min_lr_ratio", 0.0, 1.0)
  number("optim.weight_decay", 0.0)
  number("optim.b1", 0.0, 1.0)
  number("optim.b2", 0.0, 1.0)
  number("optim.eps", 0.0)
  number("optim.clip_norm", -math.inf)  # <= 0: no clipping

  integer("lora.rank", 0)
  number("lora.alpha", 0.0, lo_open=True)
  need(isinstance(c.lora.rslora, bool), "lora.rslora", "must be true or false")
  string("lora.targets")
  need(not (c.lora.rank and c.optim.freeze), "optim.freeze", "must be empty with lora.rank > 0 (LoRA trains the "
       "adapters only: the base is frozen already)")

  integer("checkpoint.every", 1)
  integer("checkpoint.keep", 1)
  integer("checkpoint.resume_step", -1)
  integer("eval.every", 0)
  integer("eval.max_batches", 0)
  integer("eval.num_samples", 0)
  integer("eval.sample_tokens", 1, 1 << 16)
  integer("log_every", 1)
  integer("max_nonfinite", 1)
  number("max_skipped_fraction", 0.0, 1.0)
  number("merge_alpha", 0.0, 1.0, lo_open=True)


def _get(c, field: str):
  node = c
  for part in field.split("."):
    node = node[part]
  return node
