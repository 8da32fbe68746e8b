"""GGUF (llama.cpp) import: dequantized parameters, the config from metadata, a rebuilt SentencePiece model.

    read_gguf("gemma-3-270m-q4_k_m.gguf") -> Imported(config, params, tokenizer, chat_template, kind, source)

Tensors are read one at a time through the `gguf` package (memory-mapped) and dequantized to f32 (Q4_K, Q5_K,
Q6_K, Q8_0, Q5_0, F16, BF16, F32, ...: every type `gguf.quants` knows), then cast to `dtype`. GGUF lists
dimensions innermost first, so a tensor shown as [640, 1024] is the [1024, 640] (HF `[out, in]`) matrix that
numpy sees; the HF-style matrices are then rearranged into the official Flax einsum shapes (docs/WEIGHTS.md
sections 1, 4, 5). llama.cpp stores RMSNorm weights as `1 + scale`; we store the zero-centred `scale`.

The tokenizer is rebuilt from `tokenizer.ggml.{tokens,scores,token_type}` as the released SentencePiece model
(docs/WEIGHTS.md section 6): BPE with byte fallback, identity normalizer, no dummy prefix, whitespace kept and
escaped as `▁`.
Two differences of llama.cpp's export are undone: user-defined pieces had `▁` turned back into spaces, and
`<start_of_turn>`/`<end_of_turn>` (and `<unk>`) were marked CONTROL; the released model has them USER_DEFINED
(so they encode from text to single ids) and UNKNOWN.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from gemma_jax.convert.common import Imported
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model.config import (DTYPES, SHAPE_FIELDS, AttentionType, TransformerConfig, match_preset,
                                    same_architecture)
from gemma_jax.progress import progress_bar
from gemma_jax.tokenizer import TURN_MARKERS, Tokenizer

ARCHITECTURES = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3": "gemma3"}
WHITESPACE = "\u2581"  # SentencePiece's escaped space, `▁`

# Per-layer GGUF tensor -> our norm name (all hold 1 + scale in the file).
_LAYER_NORMS = {"attn_norm": "pre_attention_norm", "post_attention_norm": "post_attention_norm",
                "ffn_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm"}


def read_gguf(path: str | os.PathLike, dtype: str = "float32", progress: bool = True) -> Imported:
  """Reads a Gemma 1/2/3 GGUF file into our parameter tree (numpy arrays of `dtype`), config and tokenizer."""
  import gguf

  path = os.fspath(path)
  np_dtype = _numpy_dtype(dtype)
  reader = _open(path)
  meta = _Metadata(reader, path)
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise CheckpointError(
        f"{path}: GGUF architecture {arch!r} is not supported; gemma_jax imports Gemma text models "
        f"({', '.join(ARCHITECTURES)})")
  tensors = {}
  for t in reader.tensors:
    if t.name in tensors:
      raise CheckpointError(f"{path}: tensor {t.name!r} appears twice; the file is corrupt")
    tensors[t.name] = t
  config = config_from_metadata(meta, arch, tensors, dtype)

  def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantizes tensor `name` to f32 in numpy (HF) order, checking it against the expected `shape`."""
    t = tensors.pop(name, None)
    if t is None:
      raise CheckpointError(f"{path}: tensor {name!r} is missing (the config from the metadata needs it)")
    w = dequantize_tensor(t, path)
    bar.update(1)
    if not np.isfinite(w).all():
      raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values; the file is corrupt")
    if w.shape != shape:
      raise CheckpointError(f"{path}: tensor {name!r} has shape {list(w.shape)}, but the config from the "
                            f"metadata needs {list(shape)}; the file is inconsistent")
    return w

  c = config
  L, D, F, N, K, H, V = (c.num_layers, c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.vocab_size)
  cast = lambda w: np.ascontiguousarray(w.astype(np_dtype, copy=False))
  norm = lambda name, n: {"scale": cast(take(name, (n,)) - 1.0)}
  # One tick per tensor of the file (every one is read or refused), the embedding (the largest) included.
  bar = progress_bar(total=len(tensors), desc=f"reading {os.path.basename(path)}", unit="tensor",
                     disable=not progress)
  params: dict[str, Any] = {"embedder": {"input_embedding": cast(take("token_embd.weight", (V, D)))}}
  for i in range(L):
    b = f"blk.{i}."
    q = take(b + "attn_q.weight", (N * H, D)).reshape(N, H, D).transpose(0, 2, 1)  # [N, D, H]
    k = take(b + "attn_k.weight", (K * H, D)).reshape(K, H, D).transpose(0, 2, 1)  # [K, D, H]
    v = take(b + "attn_v.weight", (K * H, D)).reshape(K, H, D).transpose(0, 2, 1)
    attn: dict[str, Any] = {}
    if K == N:
      attn["qkv_einsum"] = {"w": cast(np.stack([q, k, v]))}  # [3, N, D, H]
    else:
      attn["q_einsum"] = {"w": cast(q)}
      attn["kv_einsum"] = {"w": cast(np.stack([k, v]))}  # [2, K, D, H]
    out = take(b + "attn_output.weight", (D, N * H))
    attn["attn_vec_einsum"] = {"w": cast(out.reshape(D, N, H).transpose(1, 2, 0))}  # [N, H, D]
    if c.use_qk_norm:
      attn["_query_norm"] = norm(b + "attn_q_norm.weight", H)
      attn["_key_norm"] = norm(b + "attn_k_norm.weight", H)
    gate, up = take(b + "ffn_gate.weight", (F, D)), take(b + "ffn_up.weight", (F, D))
    layer: dict[str, Any] = {
        "attn": attn,
        "mlp": {"gating_einsum": cast(np.stack([gate, up])),  # [2, F, D]
                "linear": cast(take(b + "ffn_down.weight", (D, F)).T)},  # [F, D]
    }
    for src, dst in _LAYER_NORMS.items():
      if (dst == "post_attention_norm" and not c.use_post_attn_norm) or (
          dst == "post_ffw_norm" and not c.use_post_ffw_norm):
        continue
      layer[dst] = norm(b + src + ".weight", D)
    params[f"layer_{i}"] = layer
  params["final_norm"] = norm("output_norm.weight", D)
  bar.close()
  if tensors:
    raise CheckpointError(f"{path}: unexpected tensors {sorted(tensors)[:5]} for a {arch} model with "
                          f"{L} layers; the file does not match its metadata")

  tokenizer = tokenizer_from_gguf(meta) if "tokenizer.ggml.tokens" in meta else None
  if tokenizer is not None and tokenizer.vocab_size > V:
    raise CheckpointError(f"{path}: the tokenizer has {tokenizer.vocab_size} pieces but the embedding only "
                          f"{V} rows")
  kind, kind_from = _kind(meta)
  qtypes = sorted({gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors})
  source = {"format": "gguf", "path": os.path.abspath(path), "architecture": arch,
            "quantization_types": qtypes, "file_type": _file_type(meta.get("general.file_type")),
            "name": meta.get("general.name"), "kind_from": kind_from}
  return Imported(config=config, params=params, tokenizer=tokenizer,
                  chat_template=meta.get("tokenizer.chat_template"), kind=kind,
                  source={k: v for k, v in source.items() if v is not None})


def read_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Only the tokenizer of a GGUF file (no tensor is dequantized)."""
  path = os.fspath(path)
  meta = _Metadata(_open(path), path)
  if "tokenizer.ggml.tokens" not in meta:
    raise CheckpointError(f"{path}: the GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
  return tokenizer_from_gguf(meta)


# ---------------------------------------------------------------------------------------------------------
# Reading

def _reader_class():
  import gguf

  class Reader(gguf.GGUFReader):
    """`gguf.GGUFReader` over a plain ndarray view of its memory map: the same bytes, no copy, but slicing skips
    `np.memmap`'s per-slice bookkeeping, which made parsing the 262k-token vocabulary ~3x slower (BENCHMARKS.md)."""

    @property
    def data(self):
      return self._plain

    @data.setter
    def data(self, value):
      self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

  return Reader


def _open(path: str):
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    return _reader_class()(path, "r")
  except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is truncated "
                          f"or corrupt: download it again") from None


def dequantize_tensor(t, path: str = "<gguf>") -> np.ndarray:
  """One `gguf.ReaderTensor` as an f32 array in numpy order (GGUF's dimension list reversed)."""
  import gguf

  qtype = gguf.GGMLQuantizationType(t.tensor_type)
  if int(t.data.nbytes) != int(t.n_bytes):  # the memory map ends early: the file is cut short
    raise CheckpointError(f"{path}: tensor {t.name!r} has {t.data.nbytes} of its {t.n_bytes} bytes; the file is "
                          f"truncated: download it again")
  if qtype == gguf.GGMLQuantizationType.F64:
    w = np.asarray(t.data).view(np.float64).astype(np.float32)
  else:
    try:
      w = gguf.quants.dequantize(t.data, qtype)
    except NotImplementedError:
      raise CheckpointError(f"{path}: tensor {t.name!r} has type {qtype.name}, which the gguf package cannot "
                            f"dequantize; re-quantize the file to a supported type") from None
  shape = tuple(int(n) for n in reversed(list(t.shape)))
  return np.asarray(w, dtype=np.float32).reshape(shape)


class _Metadata:
  """Typed access to a GGUF file's key-value metadata."""

  def __init__(self, reader, path: str):
    self.fields, self.path = reader.fields, path

  def __contains__(self, key: str) -> bool:
    return key in self.fields

  def get(self, key: str, default: Any = None) -> Any:
    f = self.fields.get(key)
    if f is None:
      return default
    try:
      v = f.contents()
    except Exception as e:
      raise CheckpointError(f"{self.path}: metadata {key!r} cannot be read ({e}); the file is corrupt") from None
    return v.item() if isinstance(v, np.generic) else v

  def require(self, key: str) -> Any:
    if key not in self.fields:
      raise CheckpointError(f"{self.path}: metadata {key!r} is missing; the file was not written by a "
                            f"Gemma-aware llama.cpp converter")
    return self.get(key)


def _numpy_dtype(dtype: str) -> np.dtype:
  import jax.numpy as jnp

  if dtype not in DTYPES:
    raise ConfigError(f"dtype={dtype!r}: use float32, bfloat16 or float16")
  return np.dtype(jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------------------------
# Config

def _clean(x: float) -> float:
  """A float32 metadata value (1e-6 reads as 9.99999997e-07) as the decimal it was written from."""
  return float(f"{float(x):.7g}")


def config_from_metadata(meta: _Metadata, arch: str, tensors: dict[str, Any], dtype: str = "float32"
                         ) -> TransformerConfig:
  """The model config from `{arch}.*` metadata; V from the embedding; gaps (query scale) filled from a preset."""
  family = ARCHITECTURES[arch]
  a = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  req = lambda key: meta.require(f"{arch}.{key}")
  if "token_embd.weight" not in tensors:
    raise CheckpointError(f"{meta.path}: tensor 'token_embd.weight' is missing; the file is not a complete model")
  num_layers, embed_dim = int(req("block_count")), int(req("embedding_length"))
  num_heads = int(req("attention.head_count"))
  num_kv_heads = int(a("attention.head_count_kv", num_heads))
  head_dim = int(a("attention.key_length", embed_dim // max(num_heads, 1)))
  value_dim = int(a("attention.value_length", head_dim))
  if value_dim != head_dim:
    raise CheckpointError(f"{meta.path}: {arch}.attention.value_length={value_dim} differs from key_length="
                          f"{head_dim}; Gemma uses one head_dim")
  emb_shape = [int(n) for n in tensors["token_embd.weight"].shape]  # GGUF order: [D, V]
  fields: dict[str, Any] = dict(
      family=family, num_layers=num_layers, embed_dim=embed_dim, hidden_dim=int(req("feed_forward_length")),
      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, vocab_size=emb_shape[-1],
      dtype=dtype, param_dtype=dtype)
  fields["norm_eps"] = _clean(a("attention.layer_norm_rms_epsilon", 1e-6))
  if a("context_length") is not None:
    fields["max_seq_len"] = int(a("context_length"))

  base = _clean(a("rope.freq_base", 10_000.0))
  if family == "gemma3":
    # llama.cpp hard-codes the local (sliding) base at 10k for Gemma 3; newer files may say so.
    fields.update(global_base_frequency=base, local_base_frequency=_clean(a("rope.freq_base_swa", 10_000.0)),
                  use_qk_norm=True, use_post_attn_norm=True, use_post_ffw_norm=True)
  else:
    fields.update(global_base_frequency=base, local_base_frequency=base)
  if family == "gemma2":
    fields.update(use_post_attn_norm=True, use_post_ffw_norm=True)
  scaling = a("rope.scaling.type")
  factor = a("rope.scaling.factor", a("rope.scale_linear"))
  if scaling not in (None, "none", "linear"):
    raise CheckpointError(f"{meta.path}: {arch}.rope.scaling.type={scaling!r} is not supported (Gemma uses "
                          f"linear scaling)")
  if factor is not None and scaling != "none":
    fields["global_scale_factor"] = _clean(factor)
  for key, field in (("attn_logit_softcapping", "attn_logits_soft_cap"),
                     ("final_logit_softcapping", "final_logit_soft_cap")):
    v = a(key)
    if v is not None and float(v) > 0:
      fields[field] = _clean(v)
  window = a("attention.sliding_window")
  if family != "gemma1" and window is not None:
    fields["sliding_window_size"] = int(window)
  pattern = a("attention.sliding_window_pattern")
  if isinstance(pattern, list):  # one bool per layer, True = sliding
    fields["attention_types"] = tuple(AttentionType.LOCAL if p else AttentionType.GLOBAL for p in pattern)
  elif isinstance(pattern, int) and pattern > 0:  # every pattern-th layer is global
    fields["attention_types"] = tuple(AttentionType.GLOBAL if (i + 1) % pattern == 0 else AttentionType.LOCAL
                                      for i in range(num_layers))
  scale = a("attention.scale")
  if scale is not None and float(scale) > 0:
    fields["query_pre_attn_scalar"] = _clean(float(scale) ** -2)

  preset = match_preset(fields, SHAPE_FIELDS)
  if "query_pre_attn_scalar" not in fields:
    # llama.cpp derives it from the model size: (D/N)^-0.5 for the 27B models, head_dim^-0.5 otherwise.
    fields["query_pre_attn_scalar"] = preset.query_pre_attn_scalar if preset else float(head_dim)
  if family != "gemma1" and "sliding_window_size" not in fields:
    if preset is None:
      raise CheckpointError(f"{meta.path}: metadata {arch}.attention.sliding_window is missing")
    fields["sliding_window_size"] = preset.sliding_window_size
  try:
    config = TransformerConfig(**fields)
  except ConfigError as e:
    raise CheckpointError(f"{meta.path}: the metadata describes an invalid model: {e}") from None
  if preset is not None and same_architecture(config, preset):
    config = config.replace(preset=preset.preset)
  return config


def _file_type(value) -> str | None:
  """llama.cpp's `general.file_type` number as its name, e.g. 15 -> "MOSTLY_Q4_K_M"."""
  import gguf

  if value is None:
    return None
  try:
    return gguf.LlamaFileType(int(value)).name
  except ValueError:
    return str(value)


def _kind(meta: _Metadata) -> tuple[str, str]:
  """("it" | "pt", where that came from): general.finetune / name words such as "it" or "instruct"."""
  for key in ("general.finetune", "general.name", "general.basename", "general.size_label"):
    v = meta.get(key)
    if isinstance(v, str):
      words = set(re.split(r"[^a-z0-9]+", v.lower()))
      if words & {"it", "instruct", "instruction", "chat"}:
        return "it", key
  return "pt", "default: no instruction-tuned marker in general.finetune/general.name"


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

def tokenizer_from_gguf(meta: _Metadata) -> Tokenizer:
  """Rebuilds the SentencePiece model proto from `tokenizer.ggml.*` (see the module docstring)."""
  from sentencepiece import sentencepiece_model_pb2 as pb

  path = meta.path
  model = meta.get("tokenizer.ggml.model", "llama")
  if model != "llama":
    raise CheckpointError(f"{path}: tokenizer.ggml.model={model!r}; only SentencePiece ('llama') vocabularies "
                          f"can be rebuilt")
  tokens = meta.require("tokenizer.ggml.tokens")
  scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  if not (len(tokens) == len(scores) == len(types)):
    raise CheckpointError(f"{path}: tokenizer.ggml.tokens/scores/token_type have different lengths "
                          f"({len(tokens)}, {len(scores)}, {len(types)})")
  ids = {name: int(meta.get(f"tokenizer.ggml.{name}_token_id", default))
         for name, default in (("unknown", 3), ("bos", 2), ("eos", 1), ("padding", 0))}

  proto = pb.ModelProto()
  t = proto.trainer_spec
  t.model_type = pb.TrainerSpec.BPE
  t.vocab_size = len(tokens)
  t.byte_fallback = True
  t.unk_id, t.bos_id, t.eos_id, t.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
  t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = (tokens[ids[k]] for k in ("unknown", "bos", "eos",
                                                                                  "padding"))
  t.split_digits = True
  t.allow_whitespace_only_pieces = True
  n = proto.normalizer_spec
  n.name = "identity"
  n.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
  n.remove_extra_whitespaces = False
  n.escape_whitespaces = True
  n.precompiled_charsmap = b""

  P = pb.ModelProto.SentencePiece
  user_defined = {m for pair in TURN_MARKERS.values() for m in pair}
  for i, (piece, score, typ) in enumerate(zip(tokens, scores, types)):
    sp = proto.pieces.add()
    sp.piece = piece.replace(" ", WHITESPACE)  # llama.cpp wrote user-defined `▁` back as spaces
    sp.score = float(score)
    typ = int(typ)
    if i == ids["unknown"]:
      typ = P.UNKNOWN
    elif piece in user_defined:
      typ = P.USER_DEFINED
    elif typ not in (P.NORMAL, P.UNKNOWN, P.CONTROL, P.USER_DEFINED, P.UNUSED, P.BYTE):
      typ = P.NORMAL
    elif typ == P.UNKNOWN:  # only one piece may be the unknown piece
      typ = P.CONTROL
    sp.type = typ
  try:
    return Tokenizer(proto.SerializeToString())
  except Exception as e:
    raise CheckpointError(f"{path}: the GGUF vocabulary does not make a valid SentencePiece model ({e})") from None
