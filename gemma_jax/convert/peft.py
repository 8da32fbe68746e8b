"""HF peft LoRA adapter directories <-> our adapters (`gemma_jax/model/lora.py`).

    write_peft(dst, config, adapters, base_name)        adapter_config.json + adapter_model.safetensors
    read_peft(src, base_config) -> (config, adapters)   the base's config with the adapter's lora fields

A peft directory holds the adapters alone; peft loads it onto the HF base (`PeftModel.from_pretrained(model,
dst)`), the base exported with `python -m gemma_jax.convert --dst_format=hf`. Names, as peft saves them (no
adapter name), for layer i and projection p (q, k, v, o in `self_attn`; gate, up, down in `mlp`):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]   = our a [*I, r] as [in, r], transposed
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]  = our b [r, *O] as [r, out], transposed

`in` / `out` flatten our letters in order (N*H head-major, as HF's q_proj rows), so only reshapes and
transposes move between the two. Only plain LoRA is read: DoRA, biases, per-module ranks, embedding or
`modules_to_save` adapters are refused with one line.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from gemma_jax.convert.common import read_json_object
from gemma_jax.convert.detect import PEFT_CONFIG
from gemma_jax.convert.safetensors_io import ST_CODES, SafetensorsFile, write_safetensors
from gemma_jax.errors import CheckpointError
from gemma_jax.model import lora
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import flatten, param_shapes

CONFIG_FILE, WEIGHTS_FILE = PEFT_CONFIG, "adapter_model.safetensors"
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PROJECTION_OF = {m.split(".")[1]: p for p, m in MODULES.items()}  # "q_proj" -> "q"
PREFIX = "base_model.model.model."
NAME = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<module>self_attn|mlp)\.(?P<proj>\w+_proj)"
                  r"\.lora_(?P<which>[AB])\.weight$")


def _peft_name(layer: int, projection: str, which: str, prefix: str = PREFIX) -> str:
  return f"{prefix}layers.{layer}.{MODULES[projection]}.lora_{'A' if which == 'a' else 'B'}.weight"


def _where(flat_name: str) -> tuple[int, str, str]:
  """'layer_3/attn/kv_einsum/lora_k_a' -> (3, 'k', 'a')."""
  layer = int(flat_name.split("/", 1)[0][len("layer_"):])
  slot, which = flat_name.rsplit("/", 1)[1][len(lora.PREFIX):].rsplit("_", 1)
  return layer, slot, which


def to_peft(a_or_b: np.ndarray, which: str) -> np.ndarray:
  """Our a [*I, r] -> lora_A.weight [r, in]; our b [r, *O] -> lora_B.weight [out, r]."""
  x = np.asarray(a_or_b)
  flat = x.reshape(-1, x.shape[-1]) if which == "a" else x.reshape(x.shape[0], -1)
  return np.ascontiguousarray(flat.T)


def from_peft(t: np.ndarray, which: str, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `to_peft`, into our `shape`."""
  return np.ascontiguousarray(np.asarray(t).T).reshape(shape)


def _targets(pairs: set[tuple[int, str]]) -> tuple[str, list[str] | str]:
  """(our lora_targets, peft's target_modules) naming exactly the (layer, projection) pairs."""
  by_layer: dict[int, set[str]] = {}
  for layer, p in pairs:
    by_layer.setdefault(layer, set()).add(p)
  order = lambda ps: [p for p in lora.PROJECTIONS if p in ps]
  kinds = {frozenset(v) for v in by_layer.values()}
  if len(kinds) == 1:  # every adapted layer the same: names (layers without adapters have none of them)
    projs = order(next(iter(kinds)))
    return ",".join(projs), [MODULES[p].split(".")[1] for p in projs]
  ours = ",".join(f"layer_{i}/({'|'.join(order(v))})" for i, v in sorted(by_layer.items()))
  theirs = "|".join(re.escape(f"model.layers.{i}.{MODULES[p]}") for i, v in sorted(by_layer.items())
                    for p in order(v))
  return ours, theirs


def write_peft(dst: str, config: TransformerConfig, adapters: Mapping[str, Any], base_name: str,
               dtype: Any = None) -> None:
  """Writes `adapters` (our tree, `lora.split(params)[1]`) as a peft LoRA directory at `dst` (new or empty)."""
  from gemma_jax.atomic import staged
  flat = {k: np.asarray(v) for k, v in flatten(dict(adapters)).items()}
  if not flat:
    raise CheckpointError("the model carries no adapters; a peft directory holds adapters only")
  dt = np.dtype(dtype) if dtype is not None else next(iter(flat.values())).dtype
  if dt not in ST_CODES:
    raise CheckpointError(f"cannot write dtype {dt} to safetensors")
  tensors = {}
  for k, v in sorted(flat.items(), key=lambda kv: (_where(kv[0])[0], kv[0])):
    layer, slot, which = _where(k)
    tensors[_peft_name(layer, slot, which)] = to_peft(v, which).astype(dt)
  # Layers whose targets name nothing here (KV-shared layers have no k / v) are not listed.
  pairs = {(_where(k)[0], _where(k)[1]) for k in flat}
  _, target_modules = _targets(pairs)
  cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
         "r": config.lora_rank, "lora_alpha": config.lora_alpha, "use_rslora": config.lora_rslora,
         "lora_dropout": 0.0, "target_modules": target_modules, "bias": "none", "fan_in_fan_out": False,
         "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
         "alpha_pattern": {}, "use_dora": False, "layers_to_transform": None}
  with staged(dst) as tmp:
    specs = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    write_safetensors(os.path.join(tmp, WEIGHTS_FILE), specs, iter(tensors.items()))
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2)
      f.write("\n")


# Config fields whose other values change what the adapters compute (ours is plain LoRA): (field, accepted).
UNSUPPORTED = (("use_dora", (False, None)), ("bias", ("none", None)), ("lora_bias", (False, None)),
               ("modules_to_save", (None, [])), ("rank_pattern", ({}, None)), ("alpha_pattern", ({}, None)),
               ("fan_in_fan_out", (False, None)), ("trainable_token_indices", (None, {}, [])),
               ("target_parameters", (None, [])), ("layer_replication", (None,)), ("use_qalora", (False, None)))


def _refuse(path: str, what: str) -> CheckpointError:
  return CheckpointError(f"{path}: {what}; only plain LoRA adapters on q/k/v/o/gate/up/down are read")


def read_peft(src: str, base: TransformerConfig, dtype: Any = None) -> tuple[TransformerConfig, dict[str, Any]]:
  """(config: `base` with the adapter's lora fields, adapters: our tree) of the peft directory `src`."""
  cfg_path = os.path.join(src, CONFIG_FILE)
  cfg = read_json_object(cfg_path)
  if cfg.get("peft_type") != "LORA":
    raise _refuse(cfg_path, f"peft_type {cfg.get('peft_type')!r} is not LORA")
  for field, fine in UNSUPPORTED:
    if cfg.get(field) not in fine:
      raise _refuse(cfg_path, f"{field}={cfg.get(field)!r} is not supported")
  rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
  if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
    raise _refuse(cfg_path, f"r={rank!r}, lora_alpha={alpha!r}: need a positive integer rank and alpha")
  weights = os.path.join(src, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise CheckpointError(f"{src}: no {WEIGHTS_FILE} (peft's .bin adapters are pickles and never read; save "
                          "them with safe_serialization=True)")
  st = SafetensorsFile(weights)
  found: dict[tuple[int, str, str], str] = {}
  for name in st.shapes():
    m = NAME.match(name)
    if m is None or m["proj"] not in PROJECTION_OF:
      raise _refuse(weights, f"tensor {name!r} is not a LoRA matrix of a Gemma projection")
    found[(int(m["layer"]), PROJECTION_OF[m["proj"]], m["which"].lower())] = name
  pairs = {(layer, p) for layer, p, _ in found}
  if not pairs or any(layer >= base.num_layers for layer, _ in pairs):
    raise _refuse(weights, f"its layers {sorted({l for l, _ in pairs})} do not fit a {base.num_layers}-layer base")
  targets, _ = _targets(pairs)
  config = base.replace(lora_rank=rank, lora_alpha=float(alpha), lora_rslora=bool(cfg.get("use_rslora", False)),
                        lora_targets=targets)
  want = {k: tuple(v.shape) for k, v in flatten(lora.split(param_shapes(config))[1]).items()}
  out: dict[str, Any] = {}
  for k, shape in want.items():
    key = _where(k)
    if key not in found:
      raise _refuse(weights, f"no {_peft_name(*key)}: layer {key[0]}'s {key[1]} has lora_A or lora_B only")
    t = st.get(found.pop(key))
    try:
      x = from_peft(t, key[2], shape)
    except ValueError:
      raise CheckpointError(f"{weights}: {found.get(key, k)} has shape {tuple(t.shape)}, which does not fit "
                            f"rank {rank} on this base ({shape})") from None
    node = out
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x.astype(dtype) if dtype is not None else x
  if found:
    raise _refuse(weights, f"{next(iter(found.values()))} has no such projection in the base model")
  return config, out
