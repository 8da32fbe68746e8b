"""Model configuration: one frozen dataclass, presets with the real Gemma sizes.

Every preset is a constructor that takes overrides, e.g. `TransformerConfig.gemma3_1b(dtype="bfloat16")`,
and is also reachable by name: `TransformerConfig.from_preset("gemma3-1b")`. Tiny configs for tests are
plain `TransformerConfig(...)` calls; `__post_init__` rejects anything that cannot run.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, Literal

from gemma_jax.errors import ConfigError
from gemma_jax.model import lora

Family = Literal["gemma1", "gemma2", "gemma3", "gemma4"]
FAMILIES = ("gemma1", "gemma2", "gemma3", "gemma4")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "block", "dots")


class AttentionType(str, enum.Enum):
  GLOBAL = "global"
  LOCAL = "local"  # sliding window: key p visible from query q iff q - W < p <= q


def attention_pattern(family: str, num_layers: int) -> tuple[AttentionType, ...]:
  """Each family's local/global layer pattern, tiled over `num_layers`.

  Gemma 1: all global. Gemma 2: (local, global) repeated. Gemma 3 and 4: 5 local then 1 global, repeated; a
  remainder takes the pattern's prefix. Gemma 4's last layer is always global (as HF's config forces it).
  """
  g, l = AttentionType.GLOBAL, AttentionType.LOCAL
  pattern = {"gemma1": (g,), "gemma2": (l, g), "gemma3": (l, l, l, l, l, g), "gemma4": (l, l, l, l, l, g)}[family]
  types = [pattern[i % len(pattern)] for i in range(num_layers)]
  if family == "gemma4":
    types[-1] = g
  return tuple(types)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A Gemma text transformer. Letters: L layers, D embed, F MLP, N/K query/kv heads, H head dim, V vocab."""

  family: Family
  num_layers: int  # L
  embed_dim: int  # D
  hidden_dim: int  # F, per GeGLU branch
  num_heads: int  # N
  num_kv_heads: int  # K; 1 = MQA, N = MHA, else GQA
  head_dim: int  # H
  vocab_size: int  # V, rows of the embedding table
  query_pre_attn_scalar: float  # queries are multiplied by query_pre_attn_scalar ** -0.5
  attention_types: tuple[AttentionType, ...] = ()  # one per layer; () = the family's pattern
  sliding_window_size: int | None = None  # W, for LOCAL layers
  attn_logits_soft_cap: float | None = None  # Gemma 2: 50
  final_logit_soft_cap: float | None = None  # Gemma 2: 30
  use_post_attn_norm: bool = False  # Gemma 2/3
  use_post_ffw_norm: bool = False  # Gemma 2/3
  use_qk_norm: bool = False  # Gemma 3
  local_base_frequency: float = 10_000.0
  global_base_frequency: float = 10_000.0
  global_scale_factor: float = 1.0  # Gemma 3 4B+: positions / 8 on global layers (linear RoPE scaling)
  # Gemma 4 ----------------------------------------------------------------------------------------
  global_head_dim: int | None = None  # head dim of GLOBAL layers (None = head_dim); Gemma 4: 512
  num_global_kv_heads: int | None = None  # kv heads of GLOBAL layers (None = num_kv_heads)
  global_k_eq_v: bool = False  # GLOBAL layers: one projection gives the keys and (before their norms) the values
  use_value_norm: bool = False  # a scale-free RMSNorm on the values (Gemma 4)
  global_rope_fraction: float = 1.0  # GLOBAL layers rotate this fraction of the pairs ("proportional" RoPE)
  norm_plus_one: bool = True  # RMSNorm scales by (1 + scale), scale from 0 (Gemma 1-3); False: by scale, from 1
  use_layer_scalar: bool = False  # each block's output (the residual stream) times a learned scalar (Gemma 4)
  per_layer_input_dim: int = 0  # P: Gemma 4 edge models' per-layer inputs (a second table, P per layer); 0 = none
  num_kv_shared_layers: int = 0  # the last layers attend over an earlier same-type layer's keys and values
  double_wide_shared_mlp: bool = False  # KV-shared layers have an MLP of width 2F
  num_experts: int = 0  # E: Gemma 4 26B-A4B's mixture of experts beside every dense MLP; 0 = none
  experts_per_token: int = 0  # k: experts each token is routed to
  expert_hidden_dim: int = 0  # each expert's GeGLU width
  # Low-rank adapters (model/lora.py, as HF peft's LoRA) on the projections `lora_targets` names: q, k, v, o,
  # gate, up, down (peft's q_proj, ... and all-linear too) or "layer_<i>/<name>" regexes; 0 = no adapters.
  lora_rank: int = 0
  lora_alpha: float = 16.0  # adapter outputs times alpha / r (alpha / sqrt(r) with lora_rslora)
  lora_rslora: bool = False
  lora_targets: str = "all-linear"
  max_seq_len: int = 8192  # context the model was trained for (informational; caches size themselves)
  dtype: str = "float32"  # compute dtype; softmax, norms and the logits are always f32
  param_dtype: str = "float32"
  remat: str = "none"  # "none", "block" (recompute each block), "dots" (save matmul outputs only)
  norm_eps: float = 1e-6
  preset: str | None = None  # the real model this config describes, if any

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ConfigError(f"config field family={self.family!r}: unknown family; use one of {', '.join(FAMILIES)}")
    if not self.attention_types:
      object.__setattr__(self, "attention_types", attention_pattern(self.family, self.num_layers))
    else:
      object.__setattr__(self, "attention_types", tuple(AttentionType(t) for t in self.attention_types))
    self.validate()

  # ---------------------------------------------------------------------------------------------------
  def validate(self) -> None:
    def bad(field, why):
      raise ConfigError(f"config field {field}={getattr(self, field)!r}: {why}")

    if self.family not in FAMILIES:
      bad("family", f"unknown family; use one of {', '.join(FAMILIES)}")
    for f in ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
        bad(f, "must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
    if self.head_dim % 2:
      bad("head_dim", "must be even (RoPE rotates pairs)")
    if len(self.attention_types) != self.num_layers:
      bad("attention_types", f"has {len(self.attention_types)} entries for num_layers={self.num_layers}")
    if AttentionType.LOCAL in self.attention_types:
      if self.sliding_window_size is None or self.sliding_window_size <= 0:
        bad("sliding_window_size", "local (sliding-window) layers need a window > 0")
    elif self.sliding_window_size is not None and self.sliding_window_size <= 0:
      bad("sliding_window_size", "must be > 0 or None")
    for f in ("attn_logits_soft_cap", "final_logit_soft_cap"):
      v = getattr(self, f)
      if v is not None and v <= 0:
        bad(f, "must be > 0 or None")
    if self.query_pre_attn_scalar <= 0:
      bad("query_pre_attn_scalar", "must be > 0")
    if self.global_scale_factor < 1.0:
      bad("global_scale_factor", "must be >= 1")
    for f in ("global_head_dim", "num_global_kv_heads"):
      v = getattr(self, f)
      if v is not None and (not isinstance(v, int) or v <= 0):
        bad(f, "must be a positive integer or None")
    if self.num_heads % self.kv_heads_of(AttentionType.GLOBAL):
      bad("num_global_kv_heads", f"must divide num_heads={self.num_heads}")
    if self.head_dim_of(AttentionType.GLOBAL) % 2:
      bad("global_head_dim", "must be even (RoPE rotates pairs)")
    if not 0.0 <= self.global_rope_fraction <= 1.0:
      bad("global_rope_fraction", "must be in [0, 1]")
    if not isinstance(self.per_layer_input_dim, int) or self.per_layer_input_dim < 0:
      bad("per_layer_input_dim", "must be an integer >= 0")
    if not isinstance(self.num_kv_shared_layers, int) or not 0 <= self.num_kv_shared_layers < self.num_layers:
      bad("num_kv_shared_layers", f"must be in [0, num_layers={self.num_layers})")
    if self.num_experts:
      for f in ("experts_per_token", "expert_hidden_dim"):
        if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
          bad(f, "must be a positive integer with num_experts > 0")
      if self.experts_per_token > self.num_experts:
        bad("experts_per_token", f"must be <= num_experts={self.num_experts}")
    for i in range(self.num_layers - self.num_kv_shared_layers, self.num_layers):
      if self.kv_source(i) is None:
        bad("num_kv_shared_layers", f"layer {i} ({self.attention_types[i].value}) has no earlier unshared layer of "
            "its type to take keys and values from")
    if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      bad("lora_rank", "must be an integer >= 0 (0 = no adapters)")
    if self.lora_rank:
      if self.lora_alpha <= 0:
        bad("lora_alpha", "must be > 0")
      lora.check_targets(self.lora_targets, self.num_layers)
    if self.dtype not in DTYPES:
      bad("dtype", f"use one of {', '.join(DTYPES)}")
    if self.param_dtype not in DTYPES:
      bad("param_dtype", f"use one of {', '.join(DTYPES)}")
    if self.remat not in REMAT:
      bad("remat", f"use one of {', '.join(REMAT)}")

  # ---------------------------------------------------------------------------------------------------
  @property
  def num_groups(self) -> int:
    """G: query heads per kv head."""
    return self.num_heads // self.num_kv_heads

  def head_dim_of(self, attn_type: AttentionType) -> int:
    """H of a layer of this type (Gemma 4's global layers have their own)."""
    return self.global_head_dim or self.head_dim if attn_type == AttentionType.GLOBAL else self.head_dim

  def kv_heads_of(self, attn_type: AttentionType) -> int:
    """K of a layer of this type."""
    return self.num_global_kv_heads or self.num_kv_heads if attn_type == AttentionType.GLOBAL else self.num_kv_heads

  def kv_source(self, layer: int) -> int | None:
    """For a KV-shared layer (the last `num_kv_shared_layers`), the last unshared layer of its type, whose keys
    and values it attends over; None for every other layer (and for a shared layer with no such source)."""
    first_shared = self.num_layers - self.num_kv_shared_layers
    if layer < first_shared:
      return None
    same = [j for j in range(first_shared) if self.attention_types[j] == self.attention_types[layer]]
    return same[-1] if same else None

  def mlp_dim_of(self, layer: int) -> int:
    """F of a layer's MLP: 2F on KV-shared layers of double-wide models."""
    shared = layer >= self.num_layers - self.num_kv_shared_layers
    return self.hidden_dim * (2 if self.double_wide_shared_mlp and shared and self.num_kv_shared_layers else 1)

  def k_eq_v(self, attn_type: AttentionType) -> bool:
    """Whether the layer's keys and values come from one projection."""
    return self.global_k_eq_v and attn_type == AttentionType.GLOBAL

  def lora_kwargs(self, layer: int, weight: str) -> dict[str, Any]:
    """`Einsum` arguments giving layer `layer`'s weight `weight` ('q_einsum', 'linear', ...) its adapters: {}
    when the weight carries none (no adapters, or none of its projections targeted)."""
    if not self.lora_rank or weight not in lora.SLOTS:
      return {}
    patterns = lora.parse_targets(self.lora_targets)
    slots = tuple(i for i, p in enumerate(lora.SLOTS[weight]) if lora.targeted(patterns, layer, p))
    if not slots:
      return {}
    return dict(lora_slots=slots, lora_rank=self.lora_rank,
                lora_factor=lora.scale(self.lora_alpha, self.lora_rank, self.lora_rslora))

  @property
  def query_scale(self) -> float:
    return self.query_pre_attn_scalar ** -0.5

  def replace(self, **overrides) -> "TransformerConfig":
    if "num_layers" in overrides and "attention_types" not in overrides:
      overrides["attention_types"] = ()  # re-derive the pattern for the new depth
    try:
      return dataclasses.replace(self, **overrides)
    except TypeError as e:
      raise ConfigError(f"unknown config field in {sorted(overrides)}: {e}") from None

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["attention_types"] = [t.value for t in self.attention_types]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(known)}")
    d = dict(d)
    d["attention_types"] = tuple(d.get("attention_types", ()))
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  # ---------------------------------------------------------------------------------------------------
  @classmethod
  def from_preset(cls, name: str, **overrides) -> "TransformerConfig":
    key = name.replace("-", "_").replace(".", "_").lower()
    if key not in PRESETS:
      raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return getattr(cls, key)(**overrides)

  @classmethod
  def _make(cls, preset: str, overrides: dict, **fields) -> "TransformerConfig":
    fields.update(overrides)
    fields.setdefault("preset", preset)
    return cls(**fields)

  # Gemma 1 ------------------------------------------------------------------------------------------
  @classmethod
  def gemma1_2b(cls, **o):
    return cls._make("gemma1-2b", o, family="gemma1", num_layers=18, embed_dim=2048, hidden_dim=16384,
                     num_heads=8, num_kv_heads=1, head_dim=256, vocab_size=256128,
                     query_pre_attn_scalar=256, max_seq_len=8192)

  @classmethod
  def gemma1_7b(cls, **o):
    return cls._make("gemma1-7b", o, family="gemma1", num_layers=28, embed_dim=3072, hidden_dim=24576,
                     num_heads=16, num_kv_heads=16, head_dim=256, vocab_size=256128,
                     query_pre_attn_scalar=256, max_seq_len=8192)

  # Gemma 2 ------------------------------------------------------------------------------------------
  @classmethod
  def _gemma2(cls, preset, o, **fields):
    return cls._make(preset, o, family="gemma2", vocab_size=256128, sliding_window_size=4096,
                     attn_logits_soft_cap=50.0, final_logit_soft_cap=30.0, use_post_attn_norm=True,
                     use_post_ffw_norm=True, max_seq_len=8192, **fields)

  @classmethod
  def gemma2_2b(cls, **o):
    return cls._gemma2("gemma2-2b", o, num_layers=26, embed_dim=2304, hidden_dim=9216, num_heads=8,
                       num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256)

  @classmethod
  def gemma2_9b(cls, **o):
    return cls._gemma2("gemma2-9b", o, num_layers=42, embed_dim=3584, hidden_dim=14336, num_heads=16,
                       num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256)

  @classmethod
  def gemma2_27b(cls, **o):
    return cls._gemma2("gemma2-27b", o, num_layers=46, embed_dim=4608, hidden_dim=36864, num_heads=32,
                       num_kv_heads=16, head_dim=128, query_pre_attn_scalar=4608 // 32)

  # Gemma 3 (text) -----------------------------------------------------------------------------------
  @classmethod
  def _gemma3(cls, preset, o, **fields):
    fields.setdefault("global_scale_factor", 8.0)
    fields.setdefault("sliding_window_size", 1024)
    fields.setdefault("max_seq_len", 131072)
    return cls._make(preset, o, family="gemma3", vocab_size=262144, use_post_attn_norm=True,
                     use_post_ffw_norm=True, use_qk_norm=True, local_base_frequency=10_000.0,
                     global_base_frequency=1_000_000.0, **fields)

  @classmethod
  def gemma3_270m(cls, **o):
    return cls._gemma3("gemma3-270m", o, num_layers=18, embed_dim=640, hidden_dim=2048, num_heads=4,
                       num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window_size=512,
                       global_scale_factor=1.0, max_seq_len=32768)

  @classmethod
  def gemma3_1b(cls, **o):
    return cls._gemma3("gemma3-1b", o, num_layers=26, embed_dim=1152, hidden_dim=6912, num_heads=4,
                       num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window_size=512,
                       global_scale_factor=1.0, max_seq_len=32768)

  @classmethod
  def gemma3_4b(cls, **o):
    return cls._gemma3("gemma3-4b", o, num_layers=34, embed_dim=2560, hidden_dim=10240, num_heads=8,
                       num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256)

  @classmethod
  def gemma3_12b(cls, **o):
    return cls._gemma3("gemma3-12b", o, num_layers=48, embed_dim=3840, hidden_dim=15360, num_heads=16,
                       num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256)

  @classmethod
  def gemma3_27b(cls, **o):
    return cls._gemma3("gemma3-27b", o, num_layers=62, embed_dim=5376, hidden_dim=21504, num_heads=32,
                       num_kv_heads=16, head_dim=128, query_pre_attn_scalar=5376 // 32)


PRESETS = ("gemma1_2b", "gemma1_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b", "gemma3_270m", "gemma3_1b",
           "gemma3_4b", "gemma3_12b", "gemma3_27b")


def preset_names() -> list[str]:
  """Preset names as users write them: 'gemma3-270m', ..."""
  return [p.replace("_", "-") for p in PRESETS]


# What fixes the tensor shapes; with the norms, what fixes the parameter tree; with the rest, the function computed
# (everything but vocab rows, context length, dtypes, remat and the preset name).
SHAPE_FIELDS = ("family", "num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim",
                "global_head_dim", "num_global_kv_heads", "global_k_eq_v", "per_layer_input_dim",
                "num_kv_shared_layers", "double_wide_shared_mlp", "num_experts", "expert_hidden_dim")
TREE_FIELDS = SHAPE_FIELDS + ("use_qk_norm", "use_post_attn_norm", "use_post_ffw_norm", "use_layer_scalar")
ARCH_FIELDS = TREE_FIELDS + (
    "query_pre_attn_scalar", "attention_types", "sliding_window_size", "attn_logits_soft_cap",
    "final_logit_soft_cap", "use_value_norm", "local_base_frequency", "global_base_frequency",
    "global_scale_factor", "global_rope_fraction", "norm_plus_one", "experts_per_token", "norm_eps")


def match_preset(config: TransformerConfig | dict[str, Any], fields: tuple[str, ...] = ARCH_FIELDS
                 ) -> TransformerConfig | None:
  """The first preset (in PRESETS order) equal to `config` (a config or a dict of fields) on `fields`, or None.

  fields: ARCH_FIELDS (default, the same model up to vocab rows / context / dtypes), TREE_FIELDS or SHAPE_FIELDS.
  """
  defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
  get = (lambda f: config.get(f, defaults[f])) if isinstance(config, dict) else lambda f: getattr(config, f)
  for name in PRESETS:
    p = getattr(TransformerConfig, name)()
    if all(getattr(p, f) == get(f) for f in fields):
      return p
  return None


def same_architecture(a: TransformerConfig, b: TransformerConfig) -> bool:
  """Whether two configs compute the same function (dtype, context length and embedding rows aside)."""
  return all(getattr(a, f) == getattr(b, f) for f in ARCH_FIELDS)
