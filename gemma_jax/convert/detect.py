"""What a path holds: our checkpoint, a transformers Gemma directory, an official Flax checkpoint, or a GGUF.

`detect_format(path)` returns "native", "hf", "official", "gguf" or "peft" (LoRA adapters), or raises a one-line
CheckpointError saying what the path is instead and what to do (Llama directory: unsupported architecture;
pickle-only weights: refused, convert to safetensors; anything else: what a checkpoint looks like).
"""

from __future__ import annotations

import os
from typing import Literal

from gemma_jax.checkpoint_format import METADATA_FILE, looks_native
from gemma_jax.convert.common import read_json_object
from gemma_jax.convert.hf_config import HF_ARCHITECTURES, HF_MODEL_TYPES
from gemma_jax.errors import CheckpointError

Format = Literal["native", "hf", "official", "gguf", "peft"]

# Weight files that only unpickling could read (never done); lower-case suffixes.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PEFT_CONFIG = "adapter_config.json"  # what marks an HF peft adapter directory
ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "checkpoint")

EXPECTED = ("expected a gemma_jax checkpoint directory (metadata.json), a transformers Gemma directory "
            "(config.json + *.safetensors), an official Flax/orbax checkpoint directory, or a .gguf file")


def format_name(fmt: Format) -> str:
  return {"native": "a gemma_jax checkpoint", "hf": "a transformers (HF safetensors) checkpoint",
          "official": "an official Flax (orbax) checkpoint", "gguf": "a GGUF file",
          "peft": "a peft LoRA adapter directory"}[fmt]


def convert_command(src: str) -> str:
  """The exact command converting `src` to our format next to it."""
  src = os.path.normpath(src)
  stem = src[:-len(".gguf")] if src.lower().endswith(".gguf") else src
  base = " --base=BASE_CHECKPOINT" if is_peft_dir(src) else ""
  return f"python -m gemma_jax.convert --src={src}{base} --dst={stem}-gemma_jax"


def is_peft_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, PEFT_CONFIG))


def _is_gguf_file(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(4) == b"GGUF"
  except OSError:
    return False


def _pickle_error(path: str, files: list[str]) -> CheckpointError:
  shown = ", ".join(sorted(files)[:3]) + (", ..." if len(files) > 3 else "")
  return CheckpointError(
      f"{path}: pickle-based weights ({shown}) are refused: gemma_jax never unpickles files; save the model as "
      "safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True)) and pass that "
      "directory")


def _read_hf_config(path: str) -> dict:
  return read_json_object(os.path.join(path, "config.json"))


def _check_hf_architecture(path: str, cfg: dict) -> None:
  model_type = cfg.get("model_type")
  archs = cfg.get("architectures") or []
  if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
    raise CheckpointError(f"{path}/config.json: architectures must be a list of class names, got {archs!r}")
  if model_type in HF_MODEL_TYPES or any(a in HF_ARCHITECTURES for a in archs):
    return
  what = ", ".join(archs) if archs else "no architectures entry"
  raise CheckpointError(
      f"{path}/config.json: unsupported architecture ({what}; model_type {model_type!r}); gemma_jax converts "
      f"Gemma 1-4 text models (model_type one of {', '.join(HF_MODEL_TYPES)})")


def detect_format(path: str | os.PathLike) -> Format:
  """The format of the checkpoint at `path`, or a CheckpointError saying why it is not one we read."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory")

  if os.path.isfile(path):
    low = path.lower()
    if _is_gguf_file(path):
      return "gguf"
    if low.endswith(".gguf"):
      raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic at its start; truncated or corrupt?)")
    if low.endswith(PICKLE_SUFFIXES):
      raise _pickle_error(path, [os.path.basename(path)])
    if low.endswith(".safetensors"):
      raise CheckpointError(f"{path}: a lone safetensors file; pass the directory that holds it together with "
                            "its config.json")
    raise CheckpointError(f"{path}: not a checkpoint; {EXPECTED}")

  try:
    files = os.listdir(path)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot list the directory ({e.strerror})") from None
  if METADATA_FILE in files and looks_native(path):
    return "native"
  if PEFT_CONFIG in files:
    return "peft"

  has_safetensors = any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files)
  pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json")]
  if "config.json" in files:
    _check_hf_architecture(path, _read_hf_config(path))
    if has_safetensors:
      return "hf"
    if pickles:
      raise _pickle_error(path, pickles)
    raise CheckpointError(f"{path}: a transformers config.json but no *.safetensors weights beside it")
  if has_safetensors:
    raise CheckpointError(f"{path}: safetensors weights without a config.json; copy the model's config.json "
                          "into the directory")
  if pickles:
    raise _pickle_error(path, pickles)

  inner = os.path.dirname(os.path.normpath(path))
  for parent in (inner, os.path.dirname(inner)):  # <ckpt>/params or <ckpt>/params/<group>
    if looks_native(parent):
      raise CheckpointError(f"{path} is inside a gemma_jax checkpoint; pass the checkpoint directory {parent}")
  if any(m in files for m in ORBAX_MARKERS):
    return "official"

  ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
  if ggufs:
    raise CheckpointError(f"{path}: a directory holding GGUF files; pass the file itself, e.g. "
                          f"--src={os.path.join(path, ggufs[0])}")
  raise CheckpointError(f"{path}: not a checkpoint; {EXPECTED}")

