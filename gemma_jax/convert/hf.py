"""HF transformers checkpoint directories (Gemma, Gemma2, Gemma3 text; the language model of multimodal Gemma 3).

    read_hf(dir) -> Imported        config.json + safetensors (single, or sharded with an index), tokenizer.model,
                                    chat template; tensor by tensor (lazy), never unpickling anything
    write_hf(dir, config, params)   safetensors (5 GB shards) + config.json + generation_config.json
                                    (+ tokenizer.model, tokenizer.json, tokenizer_config.json,
                                    special_tokens_map.json, chat_template.jinja), atomically

The pieces: `hf_config` (config.json), `hf_names` (the name map and its transforms), `safetensors_io` (the
files). Embedding rows: HF Gemma 1/2 has 256000 rows where the official Flax checkpoints have 256128; HF
multimodal Gemma 3 has 262208 (64 image rows) where the text model has 262144. Import keeps the source's rows
(or pads / trims to `vocab_rows`); export writes HF's count for the family unless `vocab_rows` says otherwise
(docs/WEIGHTS.md).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping

import numpy as np

from gemma_jax.atomic import staged
from gemma_jax.convert.common import Imported, read_json_object
from gemma_jax.convert.detect import PICKLE_SUFFIXES
from gemma_jax.convert.hf_config import config_from_hf, config_to_hf, hf_vocab_rows
from gemma_jax.convert.hf_names import hf_shapes, lm_prefix, names_in_order, params_from_hf, params_to_hf
from gemma_jax.convert.hf_tokenizer import write_tokenizer_files
from gemma_jax.convert.safetensors_io import ST_CODES, SafetensorsFile, write_safetensors
from gemma_jax.errors import CheckpointError, UserError
from gemma_jax.model.config import DTYPES, TransformerConfig
from gemma_jax.paths import inside
from gemma_jax.progress import progress_bar
from gemma_jax.tokenizer import Tokenizer

SHARD_BYTES = 5 * 1024 ** 3


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
  pickles = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(PICKLE_SUFFIXES))
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
  files = [SafetensorsFile(f) for f in _weight_files(path)]
  index = os.path.join(path, "model.safetensors.index.json")
  weights_desc = index if os.path.isfile(index) else files[0].path if len(files) == 1 else f"{path}/*.safetensors"
  owner: dict[str, SafetensorsFile] = {}
  for f in files:
    for n in f.entries:
      owner[n] = f
  shapes = {n: owner[n].entries[n][1] for n in owner}
  prefix = lm_prefix(shapes)
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
  config = config.replace(param_dtype=leaf_dtype if leaf_dtype in DTYPES
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
             progress: bool = True, shard_bytes: int = SHARD_BYTES, overwrite: bool = False) -> None:
  """Writes a transformers checkpoint directory atomically (`gemma_jax.atomic.staged`: nothing partial is
  left on error). `path` must not exist or be an empty directory, unless overwrite=True: then a directory
  at `path` is replaced (kept until the new one is complete).

  dtype: tensor dtype (None: the params' dtype); vocab_rows: embedding rows (None: HF's count for the
  family, e.g. 256128 -> 256000, 262208 -> 262144).
  """
  path = os.fspath(path).rstrip("/")
  if os.path.exists(path) and (not os.path.isdir(path) or (os.listdir(path) and not overwrite)):
    raise CheckpointError(f"{path}: already exists; choose a new output directory")
  rows = hf_vocab_rows(config) if vocab_rows is None else int(vocab_rows)
  try:
    first = params["embedder"]["input_embedding"]
  except (KeyError, TypeError):
    raise CheckpointError("parameter embedder/input_embedding is missing from the model") from None
  dt = np.dtype(dtype) if dtype is not None else np.dtype(first.dtype)
  if dt not in ST_CODES:
    raise CheckpointError(f"cannot write dtype {dt} to safetensors")
  hf_cfg = config_to_hf(config, rows, dtype=str(dt))
  shapes = {"model." + n: s for n, s in hf_shapes(config, rows).items()}
  order = [n for n, _ in names_in_order(config)]

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

  with staged(path) as tmp:
    tensors = params_to_hf(config, params, vocab_rows=rows, dtype=dt)
    tensors = iter(progress_bar(tensors, total=len(order), desc="writing tensors", unit="tensor",
                                disable=not progress))
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, specs in zip(names, shards):
      write_safetensors(os.path.join(tmp, fname), specs, tensors)
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
      write_tokenizer_files(tmp, tokenizer, chat_template, max_len=config.max_seq_len)
    elif chat_template is not None:
      with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template)


def _dump_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")
