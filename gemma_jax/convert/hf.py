"""HF transformers checkpoints (Gemma / Gemma2 / Gemma3 text, and the language model of multimodal Gemma 3).

    read_hf(dir) -> Imported        config.json + safetensors (single, or sharded with an index), tokenizer.model,
                                    chat template; tensor by tensor (lazy), never unpickling anything
    write_hf(dir, config, params)   safetensors (5 GB shards) + config.json + generation_config.json
                                    (+ tokenizer.model, tokenizer_config.json), atomically

The name map (GEMMA.md section 4), with N heads, K kv heads, H head dim, D model, F MLP:

    embedder/input_embedding [V, D]         model.embed_tokens.weight [V, D]   (head tied)
    attn/q_einsum/w [N, D, H]               self_attn.q_proj.weight [N*H, D]
    attn/kv_einsum/w [2, K, D, H]           self_attn.{k,v}_proj.weight [K*H, D]
    attn/qkv_einsum/w [3, N, D, H] (K = N)  self_attn.{q,k,v}_proj.weight [N*H, D]
    attn/attn_vec_einsum/w [N, H, D]        self_attn.o_proj.weight [D, N*H]
    attn/_query_norm, _key_norm [H]         self_attn.q_norm, k_norm
    mlp/gating_einsum [2, F, D]             mlp.gate_proj, up_proj [F, D]
    mlp/linear [F, D]                       mlp.down_proj [D, F]
    pre_attention_norm                      input_layernorm
    post_attention_norm (G2/G3)             post_attention_layernorm
    pre_ffw_norm                            pre_feedforward_layernorm; in Gemma 1: post_attention_layernorm (!)
    post_ffw_norm                           post_feedforward_layernorm
    final_norm                              model.norm

Embedding rows: HF Gemma 1/2 has 256000 rows where the official Flax checkpoints have 256128; HF multimodal
Gemma 3 has 262208 (64 image rows) where the text model has 262144. Import keeps the source's rows (or pads /
trims to `vocab_rows`); export writes HF's count for the family unless `vocab_rows` says otherwise.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open

from gemma_jax.convert.common import Imported, read_json_object
from gemma_jax.errors import CheckpointError, ConfigError, UserError
from gemma_jax.model.config import PRESETS, AttentionType, TransformerConfig
from gemma_jax.paths import inside
from gemma_jax.tokenizer import Tokenizer

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
FAMILY_OF = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3_text": "gemma3"}
SHARD_BYTES = 5 * 1024 ** 3
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")

# HF's defaults for keys a hub config.json may leave out (the config classes' defaults).
_HF_DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                  rms_norm_eps=1e-6, rope_theta=10_000.0),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, rope_theta=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                        final_logit_softcapping=None, attn_logit_softcapping=None),
}
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")

# The official (Flax) embedding rows and HF's for the same tokenizer.
HF_ROWS = {("gemma1", 256128): 256000, ("gemma2", 256128): 256000, ("gemma3", 262208): 262144}

# safetensors dtype codes <-> numpy.
_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
              "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
              "BOOL": np.dtype(np.bool_)}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------------------
# Config

def _rope_error(source: str, what: str) -> CheckpointError:
  return CheckpointError(f"{source}: unsupported RoPE setting {what}; Gemma uses default RoPE (and linear "
                         "scaling on Gemma 3 global layers)")


def _rope(params: Any, source: str, default_theta: float, key: str = "rope_parameters") -> tuple[float, float]:
  """(base, linear factor) from one rope_parameters / rope_scaling dict."""
  if params is not None and not isinstance(params, Mapping):
    raise CheckpointError(f"{source}: {key} must be an object, got {params!r}")
  params = dict(params or {})
  kind = params.get("rope_type", params.get("type", "default"))
  theta = _number(params, "rope_theta", source, default_theta, where=f"{key}.")
  if kind == "default":
    return theta, 1.0
  if kind == "linear":
    return theta, _number(params, "factor", source, 1.0, where=f"{key}.")
  raise _rope_error(source, f"rope_type={kind!r}")


# config.json fields and the JSON types they must have (a string where a number belongs is refused, not cast).
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_INT_KEYS = ("sliding_window", "sliding_window_size", "sliding_window_pattern")
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar")
_OPTIONAL_FLOAT_KEYS = ("attn_logit_softcapping", "final_logit_softcapping")


def _number(d: Mapping[str, Any], key: str, source: str, default: Any = None, *, integer: bool = False,
            where: str = "") -> Any:
  """d[key] as a finite float (or an int), `default` when absent; CheckpointError for any other JSON type."""
  v = d.get(key, default)
  if v is None:
    return None
  ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and np.isfinite(v)
  if isinstance(v, bool) or not ok:
    raise CheckpointError(f"{source}: {where}{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
  return int(v) if integer else float(v)


def _check_types(c: Mapping[str, Any], source: str) -> None:
  for k in _INT_KEYS + _OPTIONAL_INT_KEYS:
    _number(c, k, source, integer=True)
  for k in _FLOAT_KEYS + _OPTIONAL_FLOAT_KEYS:
    _number(c, k, source)
  lt = c.get("layer_types")
  if lt is not None and not (isinstance(lt, list) and all(isinstance(t, str) for t in lt)):
    raise CheckpointError(f"{source}: layer_types must be a list of strings, got {lt!r}")


def config_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> TransformerConfig:
  """Our config from a transformers config.json dict (legacy hub keys and transformers >= 5 keys).

  `source` names the file in error messages. Raises CheckpointError for architectures or settings our model
  does not implement, and for fields of the wrong type.
  """
  try:
    return _config_from_hf(cfg, source)
  except (TypeError, ValueError, AttributeError, ArithmeticError) as e:  # any shape _check_types does not foresee
    raise CheckpointError(f"{source}: malformed config ({e})") from None


def _config_from_hf(cfg: Mapping[str, Any], source: str) -> TransformerConfig:
  if not isinstance(cfg, Mapping):
    raise CheckpointError(f"{source}: expected a JSON object")
  model_type = cfg.get("model_type")
  if model_type == "gemma3":  # multimodal: the language model's config
    text = cfg.get("text_config")
    if text is not None and not isinstance(text, Mapping):
      raise CheckpointError(f"{source}: text_config must be an object, got {text!r}")
    cfg = dict(text or {})
    cfg.setdefault("model_type", "gemma3_text")
    model_type = cfg["model_type"]
  if not isinstance(model_type, str) or model_type not in FAMILY_OF:
    raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; this converter reads Gemma "
                          f"checkpoints ({', '.join(SUPPORTED_MODEL_TYPES)})")
  family = FAMILY_OF[model_type]
  c = dict(_HF_DEFAULTS[model_type])
  c.update({k: v for k, v in cfg.items() if v is not None or k.endswith("softcapping")})
  _check_types(c, source)

  act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
  # Gemma 1 hub configs say "gelu" but the model (and transformers) use the tanh approximation.
  if act not in GELU_TANH and not (family == "gemma1" and act == "gelu"):
    raise CheckpointError(f"{source}: hidden_activation {act!r} is not supported; Gemma uses gelu_pytorch_tanh")
  if c.get("attention_bias"):
    raise CheckpointError(f"{source}: attention_bias=true is not supported (Gemma has no biases)")
  if c.get("use_bidirectional_attention"):
    raise CheckpointError(f"{source}: use_bidirectional_attention=true is not supported (causal models only)")
  if c.get("tie_word_embeddings") is False:
    raise CheckpointError(f"{source}: tie_word_embeddings=false is not supported (Gemma ties the output head)")

  num_layers = int(c["num_hidden_layers"])
  if not 1 <= num_layers <= 4096:  # the per-layer lists below are built before the config is validated
    raise CheckpointError(f"{source}: num_hidden_layers={num_layers} is not a plausible number of layers")
  window = cfg.get("sliding_window") or cfg.get("sliding_window_size") or c.get("sliding_window")
  # Layer types: transformers >= 5 lists them; legacy configs give a pattern (G3) or imply one (G2: even = local).
  if c.get("layer_types"):
    names = list(c["layer_types"])
    bad = sorted(set(names) - {"sliding_attention", "full_attention"})
    if bad or len(names) != num_layers:
      raise CheckpointError(f"{source}: layer_types must list {num_layers} of sliding_attention/full_attention, "
                            f"got {names}")
    types = [AttentionType.LOCAL if t == "sliding_attention" else AttentionType.GLOBAL for t in names]
  elif family == "gemma3":
    pattern = int(c.get("sliding_window_pattern") or 6)
    if pattern < 1:
      raise CheckpointError(f"{source}: sliding_window_pattern must be >= 1, got {pattern}")
    types = [AttentionType.LOCAL if (i + 1) % pattern else AttentionType.GLOBAL for i in range(num_layers)]
  elif family == "gemma2":
    types = [AttentionType.LOCAL if i % 2 == 0 else AttentionType.GLOBAL for i in range(num_layers)]
  else:
    types = [AttentionType.GLOBAL] * num_layers
  if AttentionType.LOCAL not in types:
    window = None

  # RoPE: transformers >= 5 `rope_parameters` (per layer type for G3); legacy rope_theta/rope_local_base_freq/
  # rope_scaling.
  rp = cfg.get("rope_parameters")
  if family == "gemma3":
    if rp is not None and not isinstance(rp, Mapping):
      raise CheckpointError(f"{source}: rope_parameters must be an object, got {rp!r}")
    if rp and ("full_attention" in rp or "sliding_attention" in rp):
      global_base, scale = _rope(rp.get("full_attention"), source, c["rope_theta"])
      local_base, local_scale = _rope(rp.get("sliding_attention"), source, c["rope_local_base_freq"])
    else:
      global_base, scale = _rope(_with_theta(cfg.get("rope_scaling"), c["rope_theta"], source), source,
                                 c["rope_theta"], "rope_scaling")
      local_base, local_scale = float(c["rope_local_base_freq"]), 1.0
    if local_scale != 1.0:
      raise _rope_error(source, "scaling on sliding-window layers")
  else:
    if rp:
      base, scale = _rope(rp, source, c["rope_theta"])
    else:
      base, scale = _rope(_with_theta(cfg.get("rope_scaling"), c["rope_theta"], source), source, c["rope_theta"],
                          "rope_scaling")
    if scale != 1.0:
      raise _rope_error(source, f"rope scaling factor {scale} (Gemma 1/2 have none)")
    local_base = global_base = base

  head_dim = int(c["head_dim"])
  qpas = head_dim if family == "gemma1" else c["query_pre_attn_scalar"]
  g2or3 = family != "gemma1"
  try:
    config = TransformerConfig(
        family=family, num_layers=num_layers, embed_dim=int(c["hidden_size"]),
        hidden_dim=int(c["intermediate_size"]), num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c["num_key_value_heads"]), head_dim=head_dim, vocab_size=int(c["vocab_size"]),
        query_pre_attn_scalar=float(qpas), attention_types=tuple(types),
        sliding_window_size=None if window is None else int(window),
        attn_logits_soft_cap=_opt_float(c.get("attn_logit_softcapping")) if g2or3 else None,
        final_logit_soft_cap=_opt_float(c.get("final_logit_softcapping")) if g2or3 else None,
        use_post_attn_norm=g2or3, use_post_ffw_norm=g2or3, use_qk_norm=family == "gemma3",
        local_base_frequency=float(local_base), global_base_frequency=float(global_base),
        global_scale_factor=float(scale), max_seq_len=int(c["max_position_embeddings"]),
        norm_eps=float(c["rms_norm_eps"]))
  except ConfigError as e:
    raise CheckpointError(f"{source}: {e}") from None
  return config.replace(preset=_match_preset(config))


def _with_theta(scaling: Any, theta: Any, source: str) -> dict:
  if scaling is not None and not isinstance(scaling, Mapping):
    raise CheckpointError(f"{source}: rope_scaling must be an object, got {scaling!r}")
  return dict(scaling or {}, rope_theta=theta)


def _opt_float(x) -> float | None:
  return None if x is None else float(x)


_IGNORED_FOR_PRESET = ("vocab_size", "max_seq_len", "dtype", "param_dtype", "remat", "preset")


def _match_preset(config: TransformerConfig) -> str | None:
  """The preset this architecture is (ignoring vocab rows, context, dtypes), if any."""
  mine = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_FOR_PRESET}
  for p in PRESETS:
    ref = getattr(TransformerConfig, p)()
    if mine == {k: v for k, v in ref.to_dict().items() if k not in _IGNORED_FOR_PRESET}:
      return ref.preset
  return None


def hf_vocab_rows(config: TransformerConfig) -> int:
  """HF's embedding rows for a model whose table has `config.vocab_size` rows (256128 -> 256000, ...)."""
  return HF_ROWS.get((config.family, config.vocab_size), config.vocab_size)


def config_to_hf(config: TransformerConfig, vocab_rows: int | None = None, dtype: str = "float32") -> dict:
  """The config.json transformers >= 5 writes for this model (Gemma*ForCausalLM).

  Raises CheckpointError for configs HF's Gemma classes cannot express (e.g. Gemma 1 with soft-caps).
  """
  c = config
  fam = c.family
  def refuse(why):
    raise CheckpointError(f"cannot export this {fam} config to transformers: {why}")
  if c.norm_eps <= 0:
    refuse("norm_eps must be > 0")
  if fam == "gemma1":
    if c.query_pre_attn_scalar != c.head_dim:
      refuse(f"HF Gemma scales queries by head_dim**-0.5, config has query_pre_attn_scalar={c.query_pre_attn_scalar}")
    if (c.attn_logits_soft_cap or c.final_logit_soft_cap or c.use_post_attn_norm or c.use_post_ffw_norm
        or c.use_qk_norm or AttentionType.LOCAL in c.attention_types):
      refuse("HF Gemma has no soft-caps, post-norms, QK-norm or sliding windows")
  elif fam == "gemma2":
    if c.use_qk_norm or not (c.use_post_attn_norm and c.use_post_ffw_norm):
      refuse("HF Gemma2 has post-norms and no QK-norm")
  else:
    if not (c.use_qk_norm and c.use_post_attn_norm and c.use_post_ffw_norm):
      refuse("HF Gemma3 has QK-norm and post-norms")
  if fam != "gemma3" and (c.local_base_frequency != c.global_base_frequency or c.global_scale_factor != 1.0):
    refuse("HF Gemma 1/2 use one RoPE base and no scaling")

  layer_types = ["sliding_attention" if t == AttentionType.LOCAL else "full_attention" for t in c.attention_types]
  out: dict[str, Any] = {
      "architectures": [{"gemma1": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                         "gemma3": "Gemma3ForCausalLM"}[fam]],
      "model_type": {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[fam],
      "vocab_size": int(vocab_rows if vocab_rows is not None else hf_vocab_rows(c)),
      "hidden_size": c.embed_dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
      "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "initializer_range": 0.02,
      "attention_bias": False, "attention_dropout": 0.0, "use_cache": True, "tie_word_embeddings": True,
      "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "dtype": dtype,
  }
  if fam == "gemma1":
    out["hidden_act"] = "gelu_pytorch_tanh"
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": c.global_base_frequency}
    return out
  out["hidden_activation"] = "gelu_pytorch_tanh"
  out["query_pre_attn_scalar"] = _num(c.query_pre_attn_scalar)
  out["sliding_window"] = c.sliding_window_size if c.sliding_window_size is not None else c.max_seq_len
  out["layer_types"] = layer_types
  out["attn_logit_softcapping"] = c.attn_logits_soft_cap
  out["final_logit_softcapping"] = c.final_logit_soft_cap
  if fam == "gemma2":
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": c.global_base_frequency}
    return out
  full = {"rope_type": "default", "rope_theta": c.global_base_frequency}
  if c.global_scale_factor != 1.0:
    full = {"rope_type": "linear", "factor": c.global_scale_factor, "rope_theta": c.global_base_frequency}
  out["rope_parameters"] = {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": c.local_base_frequency}}
  out["use_bidirectional_attention"] = False
  return out


def _num(x: float):
  return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------------------------
# Parameters

def _layer_map(config: TransformerConfig, i: int) -> list[tuple[tuple[str, ...], list[str], str]]:
  """(our path, HF names, transform) for layer i. Transforms are named; see `_to_ours` / `_to_hf`."""
  c = config
  p = f"layers.{i}."
  L = f"layer_{i}"
  a = p + "self_attn."
  rows = []
  if c.num_kv_heads == c.num_heads:
    rows.append(((L, "attn", "qkv_einsum", "w"), [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                 "heads"))
  else:
    rows.append(((L, "attn", "q_einsum", "w"), [a + "q_proj.weight"], "heads1"))
    rows.append(((L, "attn", "kv_einsum", "w"), [a + "k_proj.weight", a + "v_proj.weight"], "heads"))
  rows.append(((L, "attn", "attn_vec_einsum", "w"), [a + "o_proj.weight"], "out"))
  if c.use_qk_norm:
    rows.append(((L, "attn", "_query_norm", "scale"), [a + "q_norm.weight"], "none"))
    rows.append(((L, "attn", "_key_norm", "scale"), [a + "k_norm.weight"], "none"))
  rows.append(((L, "mlp", "gating_einsum"), [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], "stack"))
  rows.append(((L, "mlp", "linear"), [p + "mlp.down_proj.weight"], "T"))
  rows.append(((L, "pre_attention_norm", "scale"), [p + "input_layernorm.weight"], "none"))
  if c.family == "gemma1":  # HF Gemma 1 calls the pre-MLP norm post_attention_layernorm
    rows.append(((L, "pre_ffw_norm", "scale"), [p + "post_attention_layernorm.weight"], "none"))
  else:
    if c.use_post_attn_norm:
      rows.append(((L, "post_attention_norm", "scale"), [p + "post_attention_layernorm.weight"], "none"))
    rows.append(((L, "pre_ffw_norm", "scale"), [p + "pre_feedforward_layernorm.weight"], "none"))
  if c.use_post_ffw_norm:
    rows.append(((L, "post_ffw_norm", "scale"), [p + "post_feedforward_layernorm.weight"], "none"))
  return rows


def name_map(config: TransformerConfig) -> list[tuple[tuple[str, ...], list[str], str]]:
  """Every parameter: (our path, HF names without the `model.` prefix, transform)."""
  rows = [(("embedder", "input_embedding"), ["embed_tokens.weight"], "none")]
  for i in range(config.num_layers):
    rows += _layer_map(config, i)
  rows.append((("final_norm", "scale"), ["norm.weight"], "none"))
  return rows


def hf_shapes(config: TransformerConfig, vocab_rows: int | None = None) -> dict[str, tuple[int, ...]]:
  """HF tensor name (without prefix) -> shape."""
  c = config
  D, F, N, K, H = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
  V = c.vocab_size if vocab_rows is None else vocab_rows
  out = {}
  for _, names, _ in name_map(config):
    for n in names:
      if n == "embed_tokens.weight":
        s = (V, D)
      elif n.endswith("q_proj.weight"):
        s = (N * H, D)
      elif n.endswith(("k_proj.weight", "v_proj.weight")):
        s = (K * H, D)
      elif n.endswith("o_proj.weight"):
        s = (D, N * H)
      elif n.endswith(("q_norm.weight", "k_norm.weight")):
        s = (H,)
      elif n.endswith(("gate_proj.weight", "up_proj.weight")):
        s = (F, D)
      elif n.endswith("down_proj.weight"):
        s = (D, F)
      else:
        s = (D,)
      out[n] = s
  return out


def _to_ours(config: TransformerConfig, kind: str, ts: list[np.ndarray]) -> np.ndarray:
  c = config
  D, H = c.embed_dim, c.head_dim
  if kind == "none":
    return ts[0]
  if kind == "heads1":  # [N*H, D] -> [N, D, H]
    return ts[0].reshape(-1, H, D).transpose(0, 2, 1)
  if kind == "heads":  # k, v (or q, k, v): [X*H, D] each -> [2|3, X, D, H]
    return np.stack([t.reshape(-1, H, D).transpose(0, 2, 1) for t in ts])
  if kind == "out":  # [D, N*H] -> [N, H, D]
    return ts[0].reshape(D, -1, H).transpose(1, 2, 0)
  if kind == "stack":  # gate, up [F, D] -> [2, F, D]
    return np.stack(ts)
  if kind == "T":  # [D, F] -> [F, D]
    return ts[0].T
  raise AssertionError(kind)


def _to_hf(config: TransformerConfig, kind: str, w: np.ndarray) -> list[np.ndarray]:
  c = config
  D, H = c.embed_dim, c.head_dim
  if kind == "none":
    return [w]
  if kind == "heads1":  # [N, D, H] -> [N*H, D]
    return [w.transpose(0, 2, 1).reshape(-1, D)]
  if kind == "heads":
    return [x.transpose(0, 2, 1).reshape(-1, D) for x in w]
  if kind == "out":  # [N, H, D] -> [D, N*H]
    return [w.transpose(2, 0, 1).reshape(D, -1)]
  if kind == "stack":
    return [w[0], w[1]]
  if kind == "T":
    return [w.T]
  raise AssertionError(kind)


# Prefixes of the language model's tensors, and of tensors that belong to other towers (ignored).
LM_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
IGNORED_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                    "model.multi_modal_projector.", "vision_model.")


def _lm_prefix(names: Iterable[str]) -> str:
  names = list(names)
  for p in LM_PREFIXES:
    if any(n.startswith(p + "embed_tokens.") for n in names):
      return p
  for p in LM_PREFIXES:
    if any(n.startswith(p + "layers.") or n.startswith(p + "norm.") for n in names):
      return p
  return "model."


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
  if w.shape[0] == rows:
    return w
  if w.shape[0] > rows:
    return w[:rows]
  return np.concatenate([w, np.zeros((rows - w.shape[0],) + w.shape[1:], w.dtype)])


def params_from_hf(config: TransformerConfig, names: Mapping[str, tuple[int, ...]] | Iterable[str],
                   get_tensor: Callable[[str], np.ndarray], dtype: Any = None, *,
                   where: Callable[[str], str] = lambda name: "the checkpoint", vocab_rows: int | None = None,
                   progress: bool = False) -> dict[str, Any]:
  """Our parameter tree from HF tensors, one tensor at a time.

  names: the checkpoint's tensor names, or a mapping name -> shape (then shapes are checked before reading);
  get_tensor(name) -> np.ndarray; dtype: target dtype (None keeps the stored one); where(name): the file
  holding a tensor, for error messages; vocab_rows: pad (zeros) or trim the embedding to this many rows.
  Every expected tensor must be present with its shape, and nothing unexpected may be left over
  (vision-tower tensors of multimodal checkpoints are skipped); otherwise CheckpointError.
  """
  shapes = dict(names) if isinstance(names, Mapping) else {n: None for n in names}
  prefix = _lm_prefix(shapes)
  expected = {prefix + n: s for n, s in hf_shapes(config).items()}
  missing = [n for n in expected if n not in shapes]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CheckpointError(f"{where(missing[0])}: tensor {missing[0]} is missing{more}; the weights do not match "
                          "config.json (incomplete download or a different model?)")
  extra = [n for n in shapes if n not in expected and n not in HEAD_NAMES
           and not n.startswith(IGNORED_PREFIXES) and not n.endswith("rotary_emb.inv_freq")]
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise CheckpointError(f"{where(extra[0])}: unexpected tensor {extra[0]}{more} for a {config.family} model "
                          f"with {config.num_layers} layers; the checkpoint does not match its config.json")

  def check(name, shape):
    if tuple(shape) != tuple(expected[name]):
      raise CheckpointError(f"{where(name)}: tensor {name} has shape {list(shape)}, config.json implies "
                            f"{list(expected[name])}; the checkpoint does not match its config")

  for n, s in shapes.items():
    if n in expected and s is not None:
      check(n, s)

  def load(name):
    t = np.asarray(get_tensor(name))
    check(name, t.shape)
    return t if dtype is None else t.astype(dtype, copy=False)

  params: dict[str, Any] = {}
  rows = name_map(config)
  for path, hf_names, kind in _progress(rows, progress, "reading tensors"):
    w = _to_ours(config, kind, [load(prefix + n) for n in hf_names])
    if path == ("embedder", "input_embedding") and vocab_rows is not None:
      w = _pad_rows(w, vocab_rows)
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = w
  for head in HEAD_NAMES:
    if head in shapes:  # a saved copy of the tied head must really be the embedding
      if not np.array_equal(np.asarray(get_tensor(head)), np.asarray(get_tensor(prefix + "embed_tokens.weight"))):
        raise CheckpointError(f"{where(head)}: {head} differs from the embedding; untied output heads are not "
                              "supported (Gemma ties them)")
  return params


def params_to_hf(config: TransformerConfig, params: Mapping[str, Any], *, prefix: str = "model.",
                 vocab_rows: int | None = None, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) one tensor at a time, in `name_map` order. vocab_rows: rows of the exported
  embedding (trim or zero-pad); dtype: cast (None keeps the params' dtype)."""
  shapes = hf_shapes(config)
  for path, hf_names, kind in name_map(config):
    node = params
    try:
      for k in path:
        node = node[k]
    except (KeyError, TypeError):
      raise CheckpointError(f"parameter {'/'.join(path)} is missing from the model") from None
    w = np.asarray(node)
    if path == ("embedder", "input_embedding") and vocab_rows is not None:
      w = _pad_rows(w, vocab_rows)
    if path != ("embedder", "input_embedding") or vocab_rows is None:
      want = _to_ours(config, kind, [np.empty(shapes[n], np.int8) for n in hf_names]).shape
      if w.shape != want:
        raise CheckpointError(f"parameter {'/'.join(path)} has shape {list(w.shape)}, the config implies "
                              f"{list(want)}")
    for n, t in zip(hf_names, _to_hf(config, kind, w)):
      if dtype is not None:
        t = t.astype(dtype, copy=False)
      yield prefix + n, np.ascontiguousarray(t)


def _progress(items, enabled: bool, desc: str):
  if not enabled:
    return items
  from tqdm.auto import tqdm
  return tqdm(items, desc=desc, unit="tensor", leave=False)


# ---------------------------------------------------------------------------------------------------------
# safetensors files: lazy reading (any dtype, bf16 included, via the header) and streaming writing

class _SafetensorsFile:
  """One safetensors file read lazily: the header up front, each tensor on request.

  `safe_open` validates the file; tensors are read at their header offsets with numpy, because safetensors'
  numpy framework cannot return bf16 (ml_dtypes provides the dtype).
  """

  def __init__(self, path: str):
    self.path = path
    try:
      try:
        with safe_open(path, framework="numpy"):
          pass
      except Exception as e:  # SafetensorError has no importable base class across versions
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise ValueError("file shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 1024 ** 2):
          raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
      self.base = 8 + n
      header.pop("__metadata__", None)
      self.entries = {}
      end_max = 0
      for name, e in header.items():
        if e["dtype"] not in _ST_DTYPES:
          raise ValueError(f"tensor {name} has unsupported dtype {e['dtype']}")
        dt = _ST_DTYPES[e["dtype"]]
        shape = tuple(int(x) for x in e["shape"])
        start, end = (int(x) for x in e["data_offsets"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
          raise ValueError(f"tensor {name}: data_offsets do not match its shape and dtype")
        end_max = max(end_max, end)
        self.entries[name] = (dt, shape, start)
      if self.base + end_max > size:
        raise ValueError(f"truncated: header describes {self.base + end_max} bytes, file has {size}")
    except RecursionError:  # a header nested deeper than json can parse
      raise CheckpointError(f"{path}: not a valid safetensors file (header nested too deeply); re-download or "
                            "re-export it") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
      msg = getattr(e, "strerror", None) or str(e)
      raise CheckpointError(f"{path}: not a valid safetensors file ({msg}); re-download or re-export it") from None

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {n: s for n, (_, s, _) in self.entries.items()}

  def get(self, name: str) -> np.ndarray:
    dt, shape, start = self.entries[name]
    count = int(np.prod(shape, dtype=np.int64))
    with open(self.path, "rb") as f:
      f.seek(self.base + start)
      a = np.fromfile(f, dtype=dt, count=count)
    if a.size != count:
      raise CheckpointError(f"{self.path}: truncated while reading tensor {name}; re-download or re-export it")
    return a.reshape(shape)


def _write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                       tensors: Iterator[tuple[str, np.ndarray]]) -> None:
  """Writes tensors in `specs` order, streaming (the header comes from the specs, the bytes one by one)."""
  header, offset = {}, 0
  for name, shape, dt in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    header[name] = {"dtype": _ST_CODES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dt in specs:
      got_name, t = next(tensors)
      assert got_name == name and t.shape == tuple(shape) and t.dtype == dt, (got_name, name, t.shape, shape)
      f.write(np.ascontiguousarray(t).view(np.uint8).data)


# ---------------------------------------------------------------------------------------------------------
# Directories

def _chat_template(path: str) -> str | None:
  jinja = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(jinja):
    try:
      with open(jinja, encoding="utf-8") as f:
        return f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{jinja}: cannot read the chat template ({getattr(e, 'strerror', None) or e})") from None
  tc = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(tc):
    t = read_json_object(tc).get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
      by_name = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
      t = by_name.get("default") or next(iter(by_name.values()), None)
    return t if isinstance(t, str) else None
  return None


def is_hf_dir(path: str) -> bool:
  """True when `path` looks like a transformers checkpoint directory (config.json with a model_type)."""
  cfg = os.path.join(path, "config.json")
  if not os.path.isfile(cfg):
    return False
  try:
    return "model_type" in read_json_object(cfg)
  except CheckpointError:
    return False


def _weight_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.lexists(index):
    wm = read_json_object(index).get("weight_map")
    if not isinstance(wm, dict) or not wm:
      raise CheckpointError(f"{index}: no weight_map; re-download the index or the checkpoint")
    for v in wm.values():
      if not isinstance(v, str):
        raise CheckpointError(f"{index}: weight_map values must be shard file names, got {v!r}")
    files = sorted(set(wm.values()))
    try:  # a shard is only read inside the checkpoint directory (an index may name /etc/passwd)
      paths = [inside(path, f, f"{index}: weight_map") for f in files]
    except UserError as e:
      raise CheckpointError(str(e)) from None
    for f, p in zip(files, paths):
      if not os.path.isfile(p):
        raise CheckpointError(f"{index}: lists {f}, which is missing from {path}; download every shard")
    return paths
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if files:
    return files
  pickles = sorted(p for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat)))
  if pickles:
    raise CheckpointError(f"{pickles[0]}: pickle-based weights are not read (unpickling can run arbitrary code); "
                          "convert them to safetensors first, e.g. save_pretrained(..., safe_serialization=True)")
  raise CheckpointError(f"{path}: no *.safetensors weights found next to config.json")


def read_hf(path: str, dtype: Any = None, progress: bool = True, vocab_rows: int | None = None) -> Imported:
  """Imports a transformers Gemma checkpoint directory, tensor by tensor.

  dtype: cast the parameters (None keeps the stored dtype); vocab_rows: pad/trim the embedding table (e.g.
  256128 to match the official Flax checkpoints). kind is None: a directory does not reliably say PT or IT.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    what = "does not exist" if not os.path.exists(path) else "is not a directory"
    raise CheckpointError(f"{path}: {what}; expected a transformers checkpoint directory (config.json + "
                          "*.safetensors)")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.lexists(cfg_path):
    raise CheckpointError(f"{path}: no config.json; not a transformers checkpoint directory")
  hf_cfg = read_json_object(cfg_path)
  config = config_from_hf(hf_cfg, cfg_path)
  files = [_SafetensorsFile(f) for f in _weight_files(path)]
  index = os.path.join(path, "model.safetensors.index.json")
  weights_desc = index if os.path.isfile(index) else files[0].path if len(files) == 1 else f"{path}/*.safetensors"
  owner: dict[str, _SafetensorsFile] = {}
  for f in files:
    for n in f.entries:
      owner[n] = f
  shapes = {n: owner[n].entries[n][1] for n in owner}
  prefix = _lm_prefix(shapes)
  emb = shapes.get(prefix + "embed_tokens.weight")
  if emb is not None and len(emb) == 2 and emb[0] != config.vocab_size:
    raise CheckpointError(f"{owner[prefix + 'embed_tokens.weight'].path}: tensor {prefix}embed_tokens.weight "
                          f"has {emb[0]} rows, config.json says vocab_size={config.vocab_size}")
  stored = sorted({str(owner[n].entries[n][0]) for n in owner if n.startswith(prefix)})
  np_dtype = None if dtype is None else np.dtype(dtype)
  params = params_from_hf(config, shapes, lambda n: owner[n].get(n), np_dtype,
                          where=lambda n: owner[n].path if n in owner else weights_desc,
                          vocab_rows=vocab_rows, progress=progress)
  if vocab_rows is not None:
    config = config.replace(vocab_size=int(vocab_rows))
  leaf_dtype = str(params["final_norm"]["scale"].dtype)
  config = config.replace(param_dtype=leaf_dtype if leaf_dtype in ("float32", "bfloat16", "float16")
                          else config.param_dtype)
  tok_path = os.path.join(path, "tokenizer.model")
  tokenizer = Tokenizer(tok_path) if os.path.isfile(tok_path) else None
  source = {"format": "hf", "path": os.path.abspath(path), "model_type": hf_cfg.get("model_type"),
            "files": [os.path.basename(f.path) for f in files], "stored_dtype": ",".join(stored)}
  if isinstance(hf_cfg.get("_name_or_path"), str) and hf_cfg["_name_or_path"]:
    source["name_or_path"] = hf_cfg["_name_or_path"]
  return Imported(config=config, params=params, tokenizer=tokenizer, chat_template=_chat_template(path),
                  kind=None, source=source)


def _default_end_of_turn(config: TransformerConfig) -> int:
  return 106 if config.family == "gemma3" else 107


def write_hf(path: str, config: TransformerConfig, params: Mapping[str, Any], tokenizer: Tokenizer | None = None,
             chat_template: str | None = None, dtype: Any = None, vocab_rows: int | None = None,
             progress: bool = True, shard_bytes: int = SHARD_BYTES) -> None:
  """Writes a transformers checkpoint directory atomically (a temp dir renamed at the end; nothing partial
  is left on error). `path` must not exist or be an empty directory.

  dtype: tensor dtype (None: the params' dtype); vocab_rows: embedding rows (None: HF's count for the
  family, e.g. 256128 -> 256000, 262208 -> 262144).
  """
  path = os.fspath(path).rstrip("/")
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise CheckpointError(f"{path}: already exists; choose a new output directory")
  rows = hf_vocab_rows(config) if vocab_rows is None else int(vocab_rows)
  try:
    first = params["embedder"]["input_embedding"]
  except (KeyError, TypeError):
    raise CheckpointError("parameter embedder/input_embedding is missing from the model") from None
  dt = np.dtype(dtype) if dtype is not None else np.dtype(first.dtype)
  if dt not in _ST_CODES:
    raise CheckpointError(f"cannot write dtype {dt} to safetensors")
  hf_cfg = config_to_hf(config, rows, dtype=str(dt))
  shapes = {"model." + n: s for n, s in hf_shapes(config, rows).items()}
  order = [n for n, _ in _names_in_order(config)]

  # Shards of at most shard_bytes, in name_map order.
  shards, cur, cur_bytes = [], [], 0
  for n in order:
    nbytes = int(np.prod(shapes[n], dtype=np.int64)) * dt.itemsize
    if cur and cur_bytes + nbytes > shard_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append((n, shapes[n], dt))
    cur_bytes += nbytes
  shards.append(cur)

  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # os.mkdir, not tempfile.mkdtemp: the directory becomes `path`, so it gets mkdir's mode (0o777 & ~umask),
  # not mkdtemp's private 0o700.
  tmp = os.path.join(parent, f"{os.path.basename(path)}.partial-{secrets.token_hex(4)}")
  os.mkdir(tmp)
  try:
    tensors = params_to_hf(config, params, vocab_rows=rows, dtype=dt)
    tensors = iter(_progress(tensors, progress, "writing tensors"))
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, specs in zip(names, shards):
      _write_safetensors(os.path.join(tmp, fname), specs, tensors)
    if len(shards) > 1:
      total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for sh in shards for _, s, d in sh)
      index = {"metadata": {"total_size": total},
               "weight_map": {n: f for f, sh in zip(names, shards) for n, _, _ in sh}}
      _dump_json(os.path.join(tmp, "model.safetensors.index.json"), index)
    _dump_json(os.path.join(tmp, "config.json"), hf_cfg)
    sp = tokenizer.special if tokenizer is not None else None
    eos = sp.eos if sp else 1
    eot = (sp.end_of_turn if sp else _default_end_of_turn(config))
    gen = {"bos_token_id": sp.bos if sp else 2, "eos_token_id": [eos] + ([eot] if eot is not None else []),
           "pad_token_id": sp.pad if sp else 0}
    _dump_json(os.path.join(tmp, "generation_config.json"), gen)
    if tokenizer is not None:
      tokenizer.save(os.path.join(tmp, "tokenizer.model"))
      tc = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": tokenizer.id_to_piece(sp.bos), "eos_token": tokenizer.id_to_piece(sp.eos),
            "unk_token": tokenizer.id_to_piece(sp.unk), "pad_token": tokenizer.id_to_piece(sp.pad),
            "model_max_length": config.max_seq_len, "padding_side": "left"}
      if chat_template is not None:
        tc["chat_template"] = chat_template
      _dump_json(os.path.join(tmp, "tokenizer_config.json"), tc)
    elif chat_template is not None:
      with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template)
    if os.path.isdir(path):
      os.rmdir(path)  # empty (checked above)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _names_in_order(config: TransformerConfig) -> list[tuple[str, tuple[int, ...]]]:
  shapes = hf_shapes(config)
  return [("model." + n, shapes[n]) for _, names, _ in name_map(config) for n in names]


def _dump_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")
