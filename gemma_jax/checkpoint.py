"""Our self-describing checkpoint format: an orbax parameter tree plus JSON metadata, written atomically.

A checkpoint is a directory:

    <path>/metadata.json     format version, model config, family/preset, kind (pt/it), chat template,
                             provenance (gemma_jax version, what it was converted from), param dtype and count,
                             every tensor's shape and dtype
    <path>/params/<group>/   the parameter tree, one orbax checkpoint per top-level group (embedder,
                             layer_0, ..., final_norm), so saving stages at most one group's host copy;
                             restored shard by shard onto a mesh
    <path>/tokenizer.model   the SentencePiece model, when there is one
    <path>/COMPLETE          written last: a directory without it is never loaded

`save` writes everything into `<path>.tmp-<random>` and renames it into place, so a crash mid-write leaves
no directory that looks valid. `load` refuses anything else with one line saying what the path is and, for
HF / GGUF / official Flax sources, the exact `python -m gemma_jax.convert` command to run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
import shutil
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import compare_to_config, flatten
from gemma_jax.model.sharding import ShardingContext
from gemma_jax.tokenizer import Tokenizer

FORMAT = "gemma_jax"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.model"
COMPLETE_FILE = "COMPLETE"
KINDS = ("pt", "it")
# zstd in orbax costs a second staging buffer per array and ~3x the save time for little gain on weights.
COMPRESS = False

Kind = Literal["pt", "it"]
Params = dict[str, Any]


@dataclasses.dataclass
class Checkpoint:
  """A loaded checkpoint. params: our nested tree (jax arrays, on the mesh when loaded with one)."""

  config: TransformerConfig
  params: Params
  tokenizer: Tokenizer | None
  template: dict[str, Any] | None  # ChatTemplate.to_dict() of the template the model goes with
  kind: Kind | None  # "pt" pretrained, "it" instruction-tuned, None unknown
  metadata: dict[str, Any]
  path: str = ""

  @property
  def is_pretrained(self) -> bool:
    return self.kind == "pt"

  @property
  def is_instruction_tuned(self) -> bool:
    return self.kind == "it"

  @property
  def family(self) -> str:
    return self.config.family

  @property
  def preset(self) -> str | None:
    return self.config.preset

  @property
  def num_params(self) -> int:
    return int(self.metadata.get("num_params", _count(self.params)))

  @property
  def provenance(self) -> dict[str, Any]:
    return self.metadata.get("provenance", {})

  def chat_template(self):
    """The saved template as a `gemma_jax.templates.ChatTemplate`, or None when none was saved."""
    if self.template is None:
      return None
    from gemma_jax.templates import ChatTemplate  # templates know the tokenizer, not checkpoints
    return ChatTemplate.from_dict(self.template)


# ---------------------------------------------------------------------------------------------------------
# Helpers

def _count(tree: Params) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def _dtype_name(x) -> str:
  return jnp.dtype(x.dtype).name


def check_params(config: TransformerConfig, params: Params, where: str = "params") -> None:
  """Raises CheckpointError naming the first missing, extra or misshapen tensor against `config`."""
  if not isinstance(params, dict):
    raise CheckpointError(f"{where}: expected a nested dict of arrays, got {type(params).__name__}")
  missing, extra, wrong = compare_to_config(config, flatten(params))
  if missing:
    raise CheckpointError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing in all) for a "
                          f"{config.family} model with {config.num_layers} layers")
  if extra:
    raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} extra in all) for a "
                          f"{config.family} model with {config.num_layers} layers")
  if wrong:
    name, got, want = wrong[0]
    raise CheckpointError(f"{where}: tensor {name!r} has shape {got} but the config implies {want}")


def _version() -> str:
  import gemma_jax
  return gemma_jax.__version__


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _random_suffix() -> str:
  """Random, and the same on every process (all of them write shards into one temporary directory)."""
  token = secrets.randbits(31)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    token = int(multihost_utils.broadcast_one_to_all(np.int32(token)))
  return f"{token:08x}"


def _fsync_write(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def is_checkpoint(path: str | os.PathLike) -> bool:
  """True for a complete gemma_jax checkpoint directory."""
  path = os.fspath(path)
  return (os.path.isfile(os.path.join(path, METADATA_FILE))
          and os.path.isfile(os.path.join(path, COMPLETE_FILE)))


def _looks_native(path: str) -> bool:
  try:
    with open(os.path.join(path, METADATA_FILE)) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


# ---------------------------------------------------------------------------------------------------------
# Save


def save(path: str | os.PathLike, *, config: TransformerConfig, params: Params,
         tokenizer: Tokenizer | None = None, template: dict[str, Any] | None = None,
         kind: Kind | None = None, provenance: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None, overwrite: bool = True) -> None:
  """Writes a checkpoint atomically (temporary directory, then rename).

  params: our nested tree; numpy arrays or jax arrays (sharded ones are written shard by shard by each
  process). template: `ChatTemplate.to_dict()` or None. kind: "pt", "it" or None. provenance: e.g.
  {"converted_from": {"format": "hf", "path": ...}}; gemma_jax's version and the time are added.
  overwrite: replace an existing gemma_jax checkpoint at `path` (a directory that is not one is never
  replaced).
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  if kind not in (*KINDS, None):
    raise CheckpointError(f"kind={kind!r}: use 'pt' (pretrained), 'it' (instruction-tuned) or None")
  if template is not None and not isinstance(template, dict):
    raise CheckpointError(f"template: expected ChatTemplate.to_dict() (a dict), got {type(template).__name__}")
  if os.path.lexists(path):
    if not os.path.isdir(path) or not _looks_native(path):
      raise CheckpointError(f"{path} exists and is not a gemma_jax checkpoint; refusing to overwrite it "
                            "(choose another path or delete it)")
    if not overwrite:
      raise CheckpointError(f"{path} exists; delete it or choose another path")
  check_params(config, params, where=f"saving {path}")

  flat = flatten(params)
  dtypes = sorted({_dtype_name(x) for x in flat.values()})
  if len(dtypes) == 1 and dtypes[0] != config.param_dtype:
    config = config.replace(param_dtype=dtypes[0])  # the config describes what is on disk
  metadata = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "family": config.family,
      "preset": config.preset,
      "kind": kind,
      "config": config.to_dict(),
      "template": template,
      "tokenizer": TOKENIZER_FILE if tokenizer is not None else None,
      "param_dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
      "num_params": _count(params),
      "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v)} for k, v in sorted(flat.items())},
      "provenance": {"gemma_jax_version": _version(),
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     **(provenance or {})},
      "extra": extra or {},
  }
  try:
    meta_bytes = json.dumps(metadata, indent=2, allow_nan=False).encode()
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"saving {path}: metadata is not JSON-serializable ({e})") from None

  parent = os.path.dirname(path)
  tmp = f"{path}.tmp-{_random_suffix()}"
  if _is_primary():
    os.makedirs(parent, exist_ok=True)
    os.makedirs(tmp)
  _sync(f"gemma_jax_save_mkdir:{tmp}")
  try:
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=COMPRESS))
    for group in sorted(params):
      # One orbax item per top-level group: orbax stages a host copy of what it writes, so this bounds the
      # extra memory by the largest group (measured in benchmarks/convert_memory.py).
      ckptr.save(os.path.join(tmp, PARAMS_DIR, group), args=ocp.args.PyTreeSave(params[group]))
    if _is_primary():
      if tokenizer is not None:
        _fsync_write(os.path.join(tmp, TOKENIZER_FILE), tokenizer.model_proto)
      _fsync_write(os.path.join(tmp, METADATA_FILE), meta_bytes)
      _fsync_write(os.path.join(tmp, COMPLETE_FILE), f"{FORMAT} checkpoint, written completely\n".encode())
    _sync(f"gemma_jax_save_written:{tmp}")
    if _is_primary():
      _move_into_place(tmp, path)
    _sync(f"gemma_jax_save_done:{tmp}")
  except BaseException:  # KeyboardInterrupt too: leave nothing half-written behind
    if _is_primary():
      shutil.rmtree(tmp, ignore_errors=True)
    raise


def _move_into_place(tmp: str, path: str) -> None:
  """Renames `tmp` to `path`; an existing checkpoint at `path` is moved aside first, then deleted."""
  old = None
  if os.path.lexists(path):
    old = f"{path}.old-{secrets.token_hex(4)}"
    os.rename(path, old)
  os.rename(tmp, path)
  try:  # make the rename durable
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Load


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of a complete checkpoint, without touching the parameters (CheckpointError otherwise)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory")
  if not _looks_native(path):
    _raise_not_native(path)
  if not os.path.isfile(os.path.join(path, COMPLETE_FILE)):
    raise CheckpointError(f"{path}: incomplete gemma_jax checkpoint (no {COMPLETE_FILE} marker: its save was "
                          "interrupted); delete it and save or convert again")
  with open(os.path.join(path, METADATA_FILE)) as f:
    metadata = json.load(f)
  version = metadata.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this gemma_jax "
                          f"({_version()}, format {FORMAT_VERSION}) reads; upgrade gemma_jax")
  return metadata


def _raise_not_native(path: str) -> None:
  from gemma_jax.convert.detect import convert_command, detect_format, format_name
  fmt = detect_format(path)  # raises its own clear error for anything that is not a checkpoint at all
  raise CheckpointError(f"{path} is {format_name(fmt)}, not a gemma_jax checkpoint; convert it first: "
                        f"{convert_command(path)}")


def _as_context(sharding) -> ShardingContext | None:
  if sharding is None or isinstance(sharding, ShardingContext):
    return sharding
  if isinstance(sharding, jax.sharding.Mesh):
    return ShardingContext(sharding)
  raise TypeError(f"sharding: expected a ShardingContext or a Mesh, got {type(sharding).__name__}")


def load(path: str | os.PathLike, *, sharding: ShardingContext | jax.sharding.Mesh | None = None,
         mesh: jax.sharding.Mesh | None = None, dtype: str | None = None) -> Checkpoint:
  """Reads a checkpoint written by `save`.

  sharding: a ShardingContext (or a Mesh; `mesh=` says the same): each device restores only its shard of
  every parameter, placed by `param_shardings(config, ctx)`; None: the parameters land on the first local
  device. dtype: cast the parameters on restore ("float32", "bfloat16", ...); the config's param_dtype follows.
  """
  import orbax.checkpoint as ocp
  from gemma_jax.model.params import param_shapes, param_shardings

  path = os.path.abspath(os.fspath(path))
  metadata = read_metadata(path)
  try:
    config = TransformerConfig.from_dict(metadata["config"])
  except KeyError:
    raise CheckpointError(f"{path}/{METADATA_FILE}: no 'config' entry") from None
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}/{METADATA_FILE}: bad model config ({e})") from None
  if dtype is not None:
    from gemma_jax.model.config import DTYPES
    if dtype not in DTYPES:
      raise CheckpointError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    config = config.replace(param_dtype=dtype)

  shapes = param_shapes(config)
  saved = metadata.get("tensors") or {}
  for name, s in flatten(shapes).items():  # a clear line before orbax says anything cryptic
    if name not in saved:
      raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
    if tuple(saved[name]["shape"]) != tuple(s.shape):
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(saved[name]['shape'])} but the config "
                            f"implies {tuple(s.shape)}")

  if mesh is not None:
    if sharding is not None:
      raise TypeError("load: pass either sharding= or mesh=, not both")
    sharding = mesh
  ctx = _as_context(sharding)
  if ctx is not None:
    shardings = param_shardings(config, ctx)
  else:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, shapes)
  jdtype = None if dtype is None else jnp.dtype(dtype)
  restore_args = jax.tree.map(
      lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=tuple(s.shape), dtype=jdtype),
      shapes, shardings)
  params_dir = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"{path}: the {PARAMS_DIR}/ directory is missing; the checkpoint is damaged")
  ckptr = ocp.PyTreeCheckpointer()
  params = {}
  for group in sorted(restore_args):
    try:
      params[group] = ckptr.restore(os.path.join(params_dir, group),
                                    args=ocp.args.PyTreeRestore(restore_args=restore_args[group]))
    except (FileNotFoundError, ValueError) as e:
      raise CheckpointError(f"{params_dir}/{group}: cannot restore the parameters "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); the checkpoint is "
                            "damaged") from None

  tokenizer = None
  if metadata.get("tokenizer"):
    tok_path = os.path.join(path, metadata["tokenizer"])
    if not os.path.isfile(tok_path):
      raise CheckpointError(f"{path}: {metadata['tokenizer']} is listed in the metadata but missing")
    tokenizer = Tokenizer(tok_path)
  kind = metadata.get("kind")
  if kind not in (*KINDS, None):
    raise CheckpointError(f"{path}/{METADATA_FILE}: kind={kind!r}; expected 'pt', 'it' or null")
  return Checkpoint(config=config, params=params, tokenizer=tokenizer, template=metadata.get("template"),
                    kind=kind, metadata=metadata, path=path)
