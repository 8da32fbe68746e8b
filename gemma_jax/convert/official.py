"""The official Flax/orbax Gemma checkpoints (google-deepmind/gemma): import, and export in the released layout.

    read_official("gemma2-2b-it/")  -> Imported(config, params, tokenizer, kind, source)
    write_official(path, config, params)

Two layouts are read (docs/WEIGHTS.md 3):
  flat (as released):  {"transformer/layer_0/attn/q_einsum": {"w": [N, D, H]}, ...,
                        "transformer/layer_0/mlp/gating_einsum": {"w": [2, F, D] or [2, D, F]}}
  nested (Flax module tree): {"transformer": {"layer_0": {"attn": {...}, "mlp": {"gating_einsum": ...}}}}
                        (with or without the "transformer" level; MLP leaves have no "w" level)
Our tree uses the official names, so the import is renaming-free apart from dropping the "transformer" prefix
and the MLP `w` level and turning `gating_einsum` [2, D, F] (Gemma 1, Gemma 2 2B) into our [2, F, D].

The config is inferred from the shapes (L, D, F, N, K, H, V; post-norms and QK-norm give the family) and
must match a preset, which supplies what shapes cannot tell (sliding window, soft-caps, RoPE, query scale);
pass `preset=` (a name or a `TransformerConfig`) for anything else. orbax restores msgpack/tensorstore data;
nothing is ever unpickled.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from gemma_jax.convert.common import Imported
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model.config import DTYPES, TREE_FIELDS, TransformerConfig, match_preset
from gemma_jax.model.params import compare_to_config, flatten
from gemma_jax.tokenizer import Tokenizer

_PREFIXES = ("params", "transformer")
_MLP_LEAVES = ("gating_einsum", "linear")


def read_official(path: str | os.PathLike, dtype: str | None = None, *,
                  preset: str | TransformerConfig | None = None,
                  tokenizer: str | os.PathLike | Tokenizer | None = None,
                  gating_layout: str | None = None) -> Imported:
  """Reads an official Flax checkpoint directory (flat or nested layout).

  dtype: cast every parameter to it ("float32", "bfloat16", "float16"); None keeps the stored dtype.
  preset: the model's preset name or config, when the shapes alone do not pin it down (they are checked).
  tokenizer: a tokenizer.model path or Tokenizer; default: a tokenizer.model beside or above the directory.
  gating_layout: "FD" or "DF", only needed for the ambiguous case F == D (no real model has it).
  """
  path = os.fspath(path)
  raw = restore_tree(path, dtype)
  layout = "flat" if any("/" in str(k) for k in raw) else "nested"
  flat = _normalize(raw, path)
  del raw
  config = infer_config(flat, path, preset=preset, gating_layout=gating_layout)
  if dtype is None:
    dtypes = {str(np.asarray(x).dtype) for x in flat.values()}
    stored = dtypes.pop() if len(dtypes) == 1 else "float32"
    if stored in DTYPES:
      config = config.replace(dtype=stored, param_dtype=stored)
  else:
    config = config.replace(dtype=dtype, param_dtype=dtype)
  gating = _gating_layout(flat, config, path, gating_layout)
  params = _build_params(flat, config, path, gating)  # consumes `flat`: one copy of the weights at a time

  tok, tok_path = _find_tokenizer(path, tokenizer)
  source = {"format": "official", "path": os.path.abspath(path), "layout": layout,
            "gating_layout": gating}
  if tok_path is not None:
    source["tokenizer"] = tok_path
  kind, kind_from = _kind(path)
  if kind is not None:
    source["kind_from"] = kind_from
  return Imported(config=config, params=params, tokenizer=tok, kind=kind, source=source)


def write_official(path: str | os.PathLike, config: TransformerConfig, params: dict[str, Any], *,
                   gating_layout: str = "FD", tokenizer: Tokenizer | None = None) -> None:
  """Writes `params` (our tree) as an official checkpoint in the released FLAT layout with orbax.

  gating_layout: "FD" writes gating_einsum as [2, F, D] (Gemma 2 9B/27B, Gemma 3), "DF" as [2, D, F]
  (Gemma 1, Gemma 2 2B). A tokenizer, if given, is saved as `tokenizer.model` beside the directory.
  """
  import jax
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  if gating_layout not in ("FD", "DF"):
    raise ConfigError(f"gating_layout={gating_layout!r}: use 'FD' or 'DF'")
  if os.path.exists(path):
    raise CheckpointError(f"{path}: already exists; choose a new directory")
  _check_shapes(flatten(params), config, path)
  flat: dict[str, dict[str, np.ndarray]] = {}
  for key, value in flatten(params).items():
    value = np.asarray(jax.device_get(value))
    parts = key.split("/")
    if parts[-1] in _MLP_LEAVES and len(parts) >= 2 and parts[-2] == "mlp":
      if parts[-1] == "gating_einsum" and gating_layout == "DF":
        value = value.transpose(0, 2, 1)
      flat["transformer/" + key] = {"w": value}
    else:
      flat["transformer/" + "/".join(parts[:-1])] = {parts[-1]: value}
  ocp.PyTreeCheckpointer().save(path, flat)
  if tokenizer is not None:
    tokenizer.save(os.path.join(os.path.dirname(path), "tokenizer.model"))


# ---------------------------------------------------------------------------------------------------------
# Restoring

def restore_tree(path: str, dtype: str | None = None) -> dict[str, Any]:
  """The raw orbax tree of a checkpoint directory, as numpy arrays (cast to `dtype` while restoring)."""
  import jax
  import orbax.checkpoint as ocp

  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory; an official Flax checkpoint is an orbax directory "
                          f"(with _METADATA or manifest.ocdbt)")
  target = None if dtype is None else np.dtype(_jnp_dtype(dtype))
  ckptr = ocp.PyTreeCheckpointer()
  try:
    args = _restore_args(ckptr.metadata(path), lambda: ocp.RestoreArgs(restore_type=np.ndarray, dtype=target))
    if args is None:  # metadata in a form we do not know: plain restore, cast afterwards
      restored = jax.tree.map(lambda x: np.asarray(x, dtype=target), ckptr.restore(path))
    else:
      restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises many types (FileNotFoundError, ValueError, tensorstore errors)
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise CheckpointError(f"{path}: cannot restore it as an orbax checkpoint ({type(e).__name__}: {msg}); "
                          f"expected an official Gemma Flax checkpoint directory") from None
  if not isinstance(restored, dict):
    raise CheckpointError(f"{path}: the orbax tree is a {type(restored).__name__}, not a dict of parameters")
  return restored


def _restore_args(meta: Any, make: Callable[[], Any]) -> dict[str, Any] | None:
  """One RestoreArgs per leaf of orbax's metadata tree (whose form varies across orbax versions)."""
  tree = meta
  for attr in ("item_metadata", "tree"):
    tree = getattr(tree, attr, tree)
  if not isinstance(tree, Mapping):
    return None

  def walk(node):
    return {k: walk(v) if isinstance(v, Mapping) else make() for k, v in node.items()}
  return walk(tree)


def _jnp_dtype(dtype: str):
  import jax.numpy as jnp

  if dtype not in DTYPES:
    raise ConfigError(f"dtype={dtype!r}: use float32, bfloat16 or float16")
  return jnp.dtype(dtype)


def _normalize(raw: dict[str, Any], path: str) -> dict[str, np.ndarray]:
  """Either layout -> {"layer_0/attn/q_einsum/w": array, "layer_0/mlp/gating_einsum": array, ...}."""
  out = {}
  for key, value in flatten(raw).items():
    parts = key.split("/")
    while parts and parts[0] in _PREFIXES:
      parts = parts[1:]
    if len(parts) >= 3 and parts[-1] == "w" and parts[-2] in _MLP_LEAVES and parts[-3] == "mlp":
      parts = parts[:-1]  # flat layout: mlp leaves carry a `w` level
    name = "/".join(parts)
    if name in out:
      raise CheckpointError(f"{path}: parameter {name!r} appears twice (under different prefixes)")
    out[name] = value
  if "embedder/input_embedding" not in out:
    shown = ", ".join(sorted(out)[:4])
    raise CheckpointError(f"{path}: no embedder/input_embedding parameter (found {shown or 'nothing'}); "
                          f"not a Gemma checkpoint")
  return out


# ---------------------------------------------------------------------------------------------------------
# Config

def _layer_indices(flat: dict[str, Any], path: str) -> int:
  idx = sorted({int(m.group(1)) for k in flat if (m := re.match(r"layer_(\d+)/", k))})
  if not idx:
    raise CheckpointError(f"{path}: no layer_<i> parameters; not a Gemma transformer checkpoint")
  if idx != list(range(len(idx))):
    missing = sorted(set(range(idx[-1] + 1)) - set(idx))
    raise CheckpointError(f"{path}: layers {missing[:5]} are missing (found layers up to {idx[-1]})")
  return len(idx)


def _shape(flat: dict[str, Any], name: str, path: str) -> tuple[int, ...]:
  if name not in flat:
    raise CheckpointError(f"{path}: parameter {name!r} is missing")
  return tuple(int(n) for n in np.shape(flat[name]))


def _gating_layout(flat: dict[str, Any], config: TransformerConfig, path: str, override: str | None) -> str:
  """"FD" when gating_einsum is [2, F, D], "DF" when [2, D, F] (decided by shape against the config)."""
  shape = _shape(flat, "layer_0/mlp/gating_einsum", path)
  F, D = config.hidden_dim, config.embed_dim
  if override is not None:
    if override not in ("FD", "DF"):
      raise ConfigError(f"gating_layout={override!r}: use 'FD' or 'DF'")
    return override
  if F == D:
    raise CheckpointError(f"{path}: gating_einsum {list(shape)} is square (F == D == {D}), so its orientation "
                          f"cannot be told from its shape; pass gating_layout='FD' or 'DF'")
  if shape == (2, F, D):
    return "FD"
  if shape == (2, D, F):
    return "DF"
  raise CheckpointError(f"{path}: layer_0/mlp/gating_einsum has shape {list(shape)}; expected [2, {F}, {D}] or "
                        f"[2, {D}, {F}]")


def infer_config(flat: dict[str, Any], path: str, *, preset: str | TransformerConfig | None = None,
                 gating_layout: str | None = None) -> TransformerConfig:
  """The model config from parameter shapes, matched to a preset (or checked against the given one)."""
  V, D = _shape(flat, "embedder/input_embedding", path)
  L = _layer_indices(flat, path)
  if "layer_0/attn/qkv_einsum/w" in flat:
    _, N, _, H = _shape(flat, "layer_0/attn/qkv_einsum/w", path)
    K = N
  else:
    N, _, H = _shape(flat, "layer_0/attn/q_einsum/w", path)
    _, K, _, _ = _shape(flat, "layer_0/attn/kv_einsum/w", path)
  F, _ = _shape(flat, "layer_0/mlp/linear", path)
  qk = "layer_0/attn/_query_norm/scale" in flat
  post_attn = "layer_0/post_attention_norm/scale" in flat
  post_ffw = "layer_0/post_ffw_norm/scale" in flat
  family = "gemma3" if qk else ("gemma2" if post_attn or post_ffw else "gemma1")
  shapes = dict(family=family, num_layers=L, embed_dim=D, hidden_dim=F, num_heads=N, num_kv_heads=K,
                head_dim=H, use_qk_norm=qk, use_post_attn_norm=post_attn, use_post_ffw_norm=post_ffw)
  seen = ", ".join(f"{k}={v}" for k, v in shapes.items())

  if isinstance(preset, TransformerConfig):
    config = preset
  elif isinstance(preset, str):
    config = TransformerConfig.from_preset(preset, vocab_size=V)
  else:
    config = match_preset(shapes, TREE_FIELDS)
    if config is not None:
      config = config.replace(vocab_size=V)
    if config is None:
      raise CheckpointError(f"{path}: the parameter shapes ({seen}, V={V}) match no preset; pass preset= with "
                            f"a preset name or a TransformerConfig for this model")
  wrong = {k: (getattr(config, k), v) for k, v in shapes.items() if getattr(config, k) != v}
  if config.vocab_size != V:
    wrong["vocab_size"] = (config.vocab_size, V)
  if wrong:
    diffs = ", ".join(f"{k}: config {a} vs checkpoint {b}" for k, (a, b) in wrong.items())
    raise CheckpointError(f"{path}: the checkpoint does not fit the given config ({diffs})")
  _gating_layout(flat, config, path, gating_layout)  # fails early on a gating shape that fits neither way
  return config


# ---------------------------------------------------------------------------------------------------------
# Parameters

def _check_shapes(flat: dict[str, Any], config: TransformerConfig, path: str) -> None:
  """Every parameter our model needs is there with the right shape, and nothing else."""
  missing, extra, wrong = compare_to_config(config, flat)
  if missing:
    raise CheckpointError(f"{path}: parameters {missing[:4]} are missing for {config.preset or config.family} "
                          f"with {config.num_layers} layers")
  if extra:
    raise CheckpointError(f"{path}: unexpected parameters {extra[:4]}; the checkpoint does not match the "
                          f"{config.preset or config.family} config")
  if wrong:
    k, got, shape = wrong[0]
    raise CheckpointError(f"{path}: parameter {k!r} has shape {list(got)}; the config needs {list(shape)}")


def _build_params(flat: dict[str, Any], config: TransformerConfig, path: str, gating_layout: str
                  ) -> dict[str, Any]:
  """Our nested tree from the normalized names, emptying `flat` as it goes (gating_layout: "FD" or "DF")."""
  if gating_layout == "DF":
    for k in [k for k in flat if k.endswith("mlp/gating_einsum")]:
      flat[k] = np.asarray(flat[k]).transpose(0, 2, 1)  # [2, D, F] -> [2, F, D], a view: no copy
  _check_shapes(flat, config, path)
  params: dict[str, Any] = {}
  for key in sorted(flat):
    *parents, leaf = key.split("/")
    node = params
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(flat.pop(key))
  return params


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and kind

def _find_tokenizer(path: str, given) -> tuple[Tokenizer | None, str | None]:
  """(tokenizer, the file it came from): `given`, else a tokenizer.model in or beside the directory."""
  if isinstance(given, Tokenizer):
    return given, None
  if given is not None:
    return Tokenizer(given), os.path.abspath(os.fspath(given))
  here = os.path.abspath(path)
  for d in (here, os.path.dirname(here)):
    p = os.path.join(d, "tokenizer.model")
    if os.path.isfile(p):
      return Tokenizer(p), p
  return None, None


def _kind(path: str) -> tuple[str | None, str]:
  """"it"/"pt" from the directory names (released names end in -it / -pt), else None."""
  here = os.path.abspath(path)
  for name in (os.path.basename(here), os.path.basename(os.path.dirname(here))):
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    if words & {"it", "instruct"}:
      return "it", f"directory name {name!r}"
    if words & {"pt", "base"}:
      return "pt", f"directory name {name!r}"
  return None, ""
