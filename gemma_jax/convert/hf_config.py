"""transformers config.json <-> our TransformerConfig (Gemma 1-4 text; the language model of multimodal Gemma 3/4).

    config_from_hf(json_dict, source) -> TransformerConfig    legacy hub keys and transformers >= 5 keys
    config_to_hf(config, vocab_rows, dtype) -> dict           what transformers >= 5 writes
    hf_vocab_rows(config)                                     HF's embedding rows (256128 -> 256000, ...)

Also the lists of model types and architectures we read, which `convert.detect` checks a directory against.
Layouts and row counts: docs/WEIGHTS.md.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model.config import AttentionType, TransformerConfig, attention_pattern, match_preset

# transformers model types / architectures we read (the language model of multimodal Gemma 3 included)
HF_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4")
HF_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                    "Gemma3ForConditionalGeneration", "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
FAMILY_OF = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma4_text": "gemma4"}
MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}  # model type -> its language model's

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
    "gemma4_text": dict(vocab_size=262144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        query_pre_attn_scalar=1.0, sliding_window=512, final_logit_softcapping=None,
                        attn_logit_softcapping=None, hidden_size_per_layer_input=256, global_head_dim=512),
}
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")

# The official (Flax) embedding rows and HF's for the same tokenizer.
HF_ROWS = {("gemma1", 256128): 256000, ("gemma2", 256128): 256000, ("gemma3", 262208): 262144}


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


def _gemma4_rope(rp: Any, source: str) -> tuple[float, float, float]:
  """(local base, global base, global rotated fraction) of a Gemma 4 rope_parameters dict."""
  if not isinstance(rp, Mapping) or "full_attention" not in rp:
    raise CheckpointError(f"{source}: Gemma 4 needs rope_parameters per layer type, got {rp!r}")
  full, local = dict(rp["full_attention"] or {}), dict(rp.get("sliding_attention") or {})
  if local.get("rope_type", "default") != "default" or full.get("rope_type") not in ("proportional", "default"):
    raise _rope_error(source, f"{full.get('rope_type')!r} / {local.get('rope_type')!r} (Gemma 4: proportional on "
                      "global layers, default on sliding ones)")
  if _number(full, "factor", source, 1.0, where="rope_parameters.full_attention.") != 1.0:
    raise _rope_error(source, "a scaling factor on Gemma 4 global layers")
  fraction = _number(full, "partial_rotary_factor", source, 1.0, where="rope_parameters.full_attention.")
  if full.get("rope_type") == "default":
    fraction = 1.0
  return (_number(local, "rope_theta", source, 10_000.0, where="rope_parameters.sliding_attention."),
          _number(full, "rope_theta", source, 1_000_000.0, where="rope_parameters.full_attention."), fraction)


def _gemma4_global_dims(c: Mapping[str, Any], types: list[AttentionType], source: str) -> tuple[int, int | None]:
  """(global head dim, global kv heads or None) from `global_head_dim` / `num_global_key_value_heads` or the
  `per_layer_config` transformers saves (the same values on every global layer)."""
  per_layer = c.get("per_layer_config")
  if isinstance(per_layer, Mapping) and per_layer:
    globals_ = [per_layer.get(str(i), per_layer.get(i)) for i, t in enumerate(types) if t == AttentionType.GLOBAL]
    if any(not isinstance(g, Mapping) for g in globals_) or len({_settings_key(g) for g in globals_}) != 1:
      raise CheckpointError(f"{source}: per_layer_config must give every full_attention layer the same settings")
    g = globals_[0]
    kv = g.get("num_key_value_heads")
    return _number(g, "head_dim", source, c["head_dim"], integer=True), (None if kv is None else int(kv))
  kv = c.get("num_global_key_value_heads") if c.get("attention_k_eq_v") else None
  return _number(c, "global_head_dim", source, 512, integer=True), (None if kv is None else int(kv))


def _settings_key(d: Mapping[str, Any]) -> str:
  return repr(sorted(d.items()))


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
  if model_type in MULTIMODAL:  # multimodal: the language model's config
    text = cfg.get("text_config")
    if text is not None and not isinstance(text, Mapping):
      raise CheckpointError(f"{source}: text_config must be an object, got {text!r}")
    cfg = dict(text or {})
    cfg.setdefault("model_type", MULTIMODAL[model_type])
    model_type = cfg["model_type"]
  if not isinstance(model_type, str) or model_type not in FAMILY_OF:
    raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; this converter reads Gemma "
                          f"checkpoints ({', '.join(HF_MODEL_TYPES)})")
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

  if family == "gemma4":
    ple_vocab = c.get("vocab_size_per_layer_input", c["vocab_size"])
    if c.get("hidden_size_per_layer_input") and ple_vocab != c["vocab_size"]:
      raise CheckpointError(f"{source}: vocab_size_per_layer_input={ple_vocab} differs from vocab_size="
                            f"{c['vocab_size']}; this version needs them equal")
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
  elif family == "gemma4":  # HF's default: 5 sliding, 1 full, and the last layer full
    types = list(attention_pattern("gemma4", num_layers))
  elif family == "gemma2":
    types = [AttentionType.LOCAL if i % 2 == 0 else AttentionType.GLOBAL for i in range(num_layers)]
  else:
    types = [AttentionType.GLOBAL] * num_layers
  if AttentionType.LOCAL not in types:
    window = None

  # RoPE: transformers >= 5 `rope_parameters` (per layer type for G3); legacy rope_theta/rope_local_base_freq/
  # rope_scaling.
  rp = cfg.get("rope_parameters")
  fraction = 1.0
  if family == "gemma4":
    local_base, global_base, fraction = _gemma4_rope(rp, source)
    scale = 1.0
  elif family == "gemma3":
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
  g4 = {}
  if family == "gemma4":  # queries unscaled; own dims on global layers; plain-scale norms; value norm
    global_head_dim, global_kv = _gemma4_global_dims(c, types, source)
    g4 = dict(global_head_dim=global_head_dim if global_head_dim != head_dim else None,
              num_global_kv_heads=global_kv if global_kv != int(c["num_key_value_heads"]) else None,
              global_k_eq_v=bool(c.get("attention_k_eq_v")), use_value_norm=True, global_rope_fraction=fraction,
              norm_plus_one=False, use_layer_scalar=True,
              per_layer_input_dim=int(c.get("hidden_size_per_layer_input") or 0),
              num_kv_shared_layers=int(c.get("num_kv_shared_layers") or 0),
              double_wide_shared_mlp=bool(c.get("use_double_wide_mlp")),
              **({} if not c.get("enable_moe_block") else dict(
                  num_experts=_number(c, "num_experts", source, integer=True),
                  experts_per_token=_number(c, "top_k_experts", source, integer=True),
                  expert_hidden_dim=_number(c, "moe_intermediate_size", source, integer=True))))
    qpas = 1.0
  try:
    config = TransformerConfig(
        family=family, num_layers=num_layers, embed_dim=int(c["hidden_size"]),
        hidden_dim=int(c["intermediate_size"]), num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c["num_key_value_heads"]), head_dim=head_dim, vocab_size=int(c["vocab_size"]),
        query_pre_attn_scalar=float(qpas), attention_types=tuple(types),
        sliding_window_size=None if window is None else int(window),
        attn_logits_soft_cap=_opt_float(c.get("attn_logit_softcapping")) if g2or3 else None,
        final_logit_soft_cap=_opt_float(c.get("final_logit_softcapping")) if g2or3 else None,
        use_post_attn_norm=g2or3, use_post_ffw_norm=g2or3, use_qk_norm=family in ("gemma3", "gemma4"),
        local_base_frequency=float(local_base), global_base_frequency=float(global_base),
        global_scale_factor=float(scale), max_seq_len=int(c["max_position_embeddings"]),
        norm_eps=float(c["rms_norm_eps"]), **g4)
  except ConfigError as e:
    raise CheckpointError(f"{source}: {e}") from None
  preset = match_preset(config)
  return config.replace(preset=preset.preset if preset is not None else None)


def _with_theta(scaling: Any, theta: Any, source: str) -> dict:
  if scaling is not None and not isinstance(scaling, Mapping):
    raise CheckpointError(f"{source}: rope_scaling must be an object, got {scaling!r}")
  return dict(scaling or {}, rope_theta=theta)


def _opt_float(x) -> float | None:
  return None if x is None else float(x)


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
  elif fam == "gemma3":
    if not (c.use_qk_norm and c.use_post_attn_norm and c.use_post_ffw_norm):
      refuse("HF Gemma3 has QK-norm and post-norms")
  else:
    if not (c.use_qk_norm and c.use_post_attn_norm and c.use_post_ffw_norm and c.use_value_norm
            and c.use_layer_scalar and not c.norm_plus_one and c.query_scale == 1.0):
      refuse("HF Gemma4 has QK-, value- and post-norms scaled by their weight, layer scalars and unscaled queries")
    if c.attn_logits_soft_cap is not None or c.global_scale_factor != 1.0:
      refuse("HF Gemma4 has no attention soft-cap and no RoPE scaling")
    if c.num_global_kv_heads is not None and not c.global_k_eq_v:
      refuse("HF Gemma4 gives global layers their own kv-head count only with attention_k_eq_v")
  if fam not in ("gemma3", "gemma4") and (c.local_base_frequency != c.global_base_frequency or c.global_scale_factor != 1.0):
    refuse("HF Gemma 1/2 use one RoPE base and no scaling")

  layer_types = ["sliding_attention" if t == AttentionType.LOCAL else "full_attention" for t in c.attention_types]
  out: dict[str, Any] = {
      "architectures": [{"gemma1": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                         "gemma3": "Gemma3ForCausalLM", "gemma4": "Gemma4ForCausalLM"}[fam]],
      "model_type": {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "gemma4": "gemma4_text"}[fam],
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
  if fam == "gemma4":
    return _gemma4_to_hf(c, out, layer_types)
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


def _gemma4_to_hf(c: TransformerConfig, out: dict, layer_types: list[str]) -> dict:
  g = AttentionType.GLOBAL
  out.update({
      "sliding_window": c.sliding_window_size if c.sliding_window_size is not None else c.max_seq_len,
      "layer_types": layer_types, "final_logit_softcapping": c.final_logit_soft_cap,
      "global_head_dim": c.head_dim_of(g), "attention_k_eq_v": c.global_k_eq_v,
      "rope_parameters": {
          "full_attention": {"rope_type": "proportional", "partial_rotary_factor": c.global_rope_fraction,
                             "rope_theta": c.global_base_frequency},
          "sliding_attention": {"rope_type": "default", "rope_theta": c.local_base_frequency}},
      "hidden_size_per_layer_input": c.per_layer_input_dim, "vocab_size_per_layer_input": out["vocab_size"],
      "num_kv_shared_layers": c.num_kv_shared_layers, "use_double_wide_mlp": c.double_wide_shared_mlp,
      "enable_moe_block": bool(c.num_experts), "num_experts": c.num_experts or None,
      "top_k_experts": c.experts_per_token or None, "moe_intermediate_size": c.expert_hidden_dim or None,
      "use_bidirectional_attention": None})
  if c.global_k_eq_v:
    out["num_global_key_value_heads"] = c.kv_heads_of(g)
  return out


def _num(x: float):
  return int(x) if float(x).is_integer() else float(x)
