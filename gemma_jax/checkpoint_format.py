"""Our checkpoint format on disk: its file names, how to recognise one, and metadata.json's validation.

    looks_native(path)              metadata.json parses and says format "gemma_jax" (never raises)
    ours_but_damaged(path)          a metadata.json that does not parse, in a directory that is otherwise ours
    parse_metadata(md_path)         the parsed JSON object, or one CheckpointError line saying it is damaged
    check_metadata(md_path, md)     the type of every entry `checkpoint.load` reads
    config_from(md_path, cfg)       the model config, or one line naming the wrong field

Below `checkpoint` and `convert.detect`, so both can recognise a checkpoint without importing each other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from gemma_jax import integrity
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model.config import TransformerConfig

FORMAT = "gemma_jax"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
COMPLETE_FILE = "COMPLETE"
KINDS = ("pt", "it")
REDO = "re-create it (convert or save it again from its source)"


def check_writable_path(path: str) -> None:
  """Refuses a directory orbax would write but never read back: it globs for its per-process files, and "["
  / "]" in the path are glob syntax (the save "succeeds", the load finds nothing)."""
  if "[" in path or "]" in path:
    raise CheckpointError(f"{path}: '[' and ']' in a checkpoint path make it unreadable (orbax treats them "
                          "as a file pattern); choose a directory name without them")


def version() -> str:
  """The running gemma_jax's version, for provenance and upgrade advice."""
  import gemma_jax
  return gemma_jax.__version__


def looks_native(path: str) -> bool:
  """True when `path/metadata.json` parses and says it is ours (complete or not)."""
  try:
    with open(os.path.join(path, METADATA_FILE)) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError, RecursionError):
    return False


def ours_but_damaged(path: str) -> bool:
  """A directory with a metadata.json that does not parse but is otherwise one of ours (or says so)."""
  if os.path.isfile(os.path.join(path, COMPLETE_FILE)) or os.path.isdir(os.path.join(path, PARAMS_DIR)):
    return True
  try:
    with open(os.path.join(path, METADATA_FILE), "rb") as f:
      return f'"{FORMAT}"'.encode() in f.read(1 << 16)
  except OSError:
    return False


def damaged(md_path: str, why: str) -> CheckpointError:
  return CheckpointError(f"{md_path}: damaged metadata.json ({why}); {REDO}")


def parse_metadata(md_path: str) -> Any:
  """The parsed metadata.json, or one line saying it is damaged (truncated, not JSON, absurdly nested)."""
  try:
    with open(md_path, "rb") as f:
      metadata = json.loads(f.read().decode("utf-8"))
  except OSError as e:
    raise CheckpointError(f"{md_path}: cannot read it ({e.strerror})") from None
  except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise damaged(md_path, "nested too deeply" if isinstance(e, RecursionError)
                  else str(e).splitlines()[0][:200]) from None
  if not isinstance(metadata, dict):
    raise damaged(md_path, f"expected a JSON object, got {type(metadata).__name__}")
  return metadata


_HEX16 = re.compile(r"^[0-9a-f]{16}$")


def check_metadata(md_path: str, md: dict[str, Any]) -> None:
  """Raises one CheckpointError line for the first entry of the wrong type (config, tensors, kind, ...)."""
  def bad(field: str, value: Any, want: str) -> None:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise damaged(md_path, f"{field}={shown}: expected {want}")

  if not isinstance(md.get("config"), dict):
    bad("config", md.get("config"), "the model config (a JSON object)")
  tensors = md.get("tensors")
  if not isinstance(tensors, dict) or not tensors:
    bad("tensors", tensors, "a JSON object of tensor name -> {shape, dtype, checksum}")
  algorithm = md.get("checksum_algorithm")
  if algorithm is not None and algorithm != integrity.ALGORITHM:
    raise CheckpointError(f"{md_path}: checksum_algorithm={algorithm!r} is unknown to this gemma_jax "
                          f"({version()}, which writes {integrity.ALGORITHM!r}); upgrade gemma_jax")
  for name, t in tensors.items():
    if not isinstance(t, dict):
      bad(f"tensors[{name!r}]", t, "{shape, dtype, checksum}")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
      bad(f"tensors[{name!r}].shape", shape, "a list of non-negative integers")
    if not isinstance(t.get("dtype"), str):
      bad(f"tensors[{name!r}].dtype", t.get("dtype"), "a dtype name")
    if algorithm is not None and not (isinstance(t.get("checksum"), str) and _HEX16.match(t["checksum"])):
      bad(f"tensors[{name!r}].checksum", t.get("checksum"), "16 hex digits")
  if md.get("tokenizer") is not None and not isinstance(md["tokenizer"], str):
    bad("tokenizer", md["tokenizer"], "a file name inside the checkpoint or null")
  if md.get("template") is not None and not isinstance(md["template"], dict):
    bad("template", md["template"], "ChatTemplate.to_dict() (a JSON object) or null")
  if md.get("kind") not in (*KINDS, None):
    bad("kind", md["kind"], "'pt', 'it' or null")
  for field in ("provenance", "extra"):
    if md.get(field) is not None and not isinstance(md[field], dict):
      bad(field, md[field], "a JSON object")


# JSON types of the config fields (annotations are strings under `from __future__ import annotations`).
_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "Family": (str,)}


def config_from(md_path: str, cfg: dict[str, Any]) -> TransformerConfig:
  """The model config of metadata.json, or one line naming the field that is wrong."""
  fields = dataclasses.fields(TransformerConfig)
  unknown = sorted(set(cfg) - {f.name for f in fields})
  if unknown:
    raise CheckpointError(f"{md_path}: unknown model config field {unknown[0]!r} ({len(unknown)} in all); written "
                          f"by a newer gemma_jax? upgrade gemma_jax ({version()}), or {REDO}")
  for f in fields:
    if f.name not in cfg:
      if f.default is dataclasses.MISSING:
        raise damaged(md_path, f"config has no {f.name!r} field")
      continue
    v, ann = cfg[f.name], str(f.type)
    base = ann.replace(" | None", "")
    if base.startswith("tuple"):
      ok, want = isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"
    else:
      types = _FIELD_TYPES.get(base, (object,))
      ok, want = isinstance(v, types) and (bool in types or not isinstance(v, bool)), base
    if not ok and not (v is None and "None" in ann):
      raise damaged(md_path, f"config field {f.name}={v!r}: expected {want}{' or null' * ('None' in ann)}")
  try:
    return TransformerConfig.from_dict(cfg)
  except (ConfigError, TypeError, ValueError) as e:
    raise damaged(md_path, f"bad model config: {e}") from None
