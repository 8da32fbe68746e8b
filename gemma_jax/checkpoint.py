"""Our self-describing checkpoint format: an orbax parameter tree plus JSON metadata, written atomically.

A checkpoint is a directory:

    <path>/metadata.json     format version, model config, family/preset, kind (pt/it), chat template,
                             provenance (gemma_jax version, what it was converted from), param dtype and count,
                             every tensor's shape, dtype and checksum (`gemma_jax.integrity`)
    <path>/params/<group>/   the parameter tree, one orbax checkpoint per top-level group (embedder,
                             layer_0, ..., final_norm), so saving stages at most one group's host copy;
                             restored shard by shard onto a mesh
    <path>/tokenizer.model   the SentencePiece model, when there is one
    <path>/COMPLETE          written last: a directory without it is never loaded

An *adapter checkpoint* (LoRA, `config.lora_rank > 0`) holds the adapter tensors only, and its metadata's
`base` names the base checkpoint (path, and `base_hash`: a hash of the base's tensor checksums); `load` reads
the base too, refuses one whose hash differs (saying which base it expects), and returns the two as one tree.

`save` writes everything into `<path>.tmp-<random>` and renames it into place, so a crash mid-write leaves
no directory that looks valid; a failed save (disk full) is one CheckpointError line and removes its partial
copy. `load` verifies every tensor against its saved checksum (checkpoints from before checksums load
unverified) and refuses anything else with one line saying what the path is and, for HF / GGUF / official
Flax sources, the exact `python -m gemma_jax.convert` command to run. `remove_stale_temporaries` clears what
killed saves leave behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import integrity
from gemma_jax.atomic import STALE, fsync_write, move_into_place, random_suffix, temp_path
from gemma_jax.checkpoint_format import (COMPLETE_FILE, FORMAT, FORMAT_VERSION, KINDS, METADATA_FILE, PARAMS_DIR,
                                         REDO, TOKENIZER_FILE, check_metadata, check_writable_path, config_from,
                                         damaged, looks_native, ours_but_damaged, parse_metadata, version)
from gemma_jax.convert.detect import convert_command, detect_format, format_name
from gemma_jax.errors import CheckpointError, UserError
from gemma_jax.model import lora
from gemma_jax.model.config import DTYPES, TransformerConfig
from gemma_jax.model.params import compare_to_config, flatten, param_shapes, param_shardings
from gemma_jax.model.sharding import ShardingContext
from gemma_jax.paths import inside
from gemma_jax.tokenizer import Tokenizer

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


def check_params(config: TransformerConfig, params: Params, where: str = "params", adapters_only: bool = False
                 ) -> None:
  """Raises CheckpointError naming the first missing, extra or misshapen tensor against `config` (against its
  adapters alone with `adapters_only`)."""
  if not isinstance(params, dict):
    raise CheckpointError(f"{where}: expected a nested dict of arrays, got {type(params).__name__}")
  missing, extra, wrong = compare_to_config(config, flatten(params))
  if adapters_only:
    missing = [k for k in missing if lora.is_adapter_name(k.rsplit("/", 1)[-1])]
  if missing:
    raise CheckpointError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing in all) for a "
                          f"{config.family} model with {config.num_layers} layers")
  if extra:
    raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} extra in all) for a "
                          f"{config.family} model with {config.num_layers} layers")
  if wrong:
    name, got, want = wrong[0]
    raise CheckpointError(f"{where}: tensor {name!r} has shape {got} but the config implies {want}")


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def base_hash(metadata: dict[str, Any]) -> str:
  """A checkpoint's content hash, from its metadata alone: sha256 of every tensor's name, shape and checksum."""
  tensors = metadata.get("tensors") or {}
  text = json.dumps({k: [v.get("shape"), v.get("checksum")] for k, v in sorted(tensors.items())
                     if not lora.is_adapter_name(k.rsplit("/", 1)[-1])})
  return hashlib.sha256(text.encode()).hexdigest()


def base_reference(path: str | os.PathLike) -> dict[str, str]:
  """What an adapter checkpoint records of its base checkpoint at `path`: {"path", "hash"}."""
  path = os.path.abspath(os.fspath(path))
  return {"path": path, "hash": base_hash(read_metadata(path))}


def is_checkpoint(path: str | os.PathLike) -> bool:
  """True for a complete gemma_jax checkpoint directory."""
  path = os.fspath(path)
  return (os.path.isfile(os.path.join(path, METADATA_FILE))
          and os.path.isfile(os.path.join(path, COMPLETE_FILE)))


# ---------------------------------------------------------------------------------------------------------
# Save


def save(path: str | os.PathLike, *, config: TransformerConfig, params: Params,
         tokenizer: Tokenizer | None = None, template: dict[str, Any] | None = None,
         kind: Kind | None = None, provenance: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None, overwrite: bool = True, base: dict[str, str] | None = None) -> None:
  """Writes a checkpoint atomically (temporary directory, then rename), with a checksum of every tensor.

  base: `base_reference(base path)` for an adapter checkpoint: `params` are then the adapters alone.

  params: our nested tree; numpy arrays or jax arrays (sharded ones are written shard by shard by each
  process, and checksummed where they live). template: `ChatTemplate.to_dict()` or None. kind: "pt", "it" or
  None. provenance: e.g. {"converted_from": {"format": "hf", "path": ...}}; gemma_jax's version and the time
  are added. overwrite: replace an existing gemma_jax checkpoint at `path` (a directory that is not one is
  never replaced). A storage failure (disk full) raises one CheckpointError line; the partial copy is removed
  and a checkpoint already at `path` is kept.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  check_writable_path(path)
  if kind not in (*KINDS, None):
    raise CheckpointError(f"kind={kind!r}: use 'pt' (pretrained), 'it' (instruction-tuned) or None")
  if template is not None and not isinstance(template, dict):
    raise CheckpointError(f"template: expected ChatTemplate.to_dict() (a dict), got {type(template).__name__}")
  existed = os.path.lexists(path)
  if existed:
    ours = looks_native(path) or (os.path.isfile(os.path.join(path, METADATA_FILE)) and ours_but_damaged(path))
    if not os.path.isdir(path) or not ours:
      raise CheckpointError(f"{path} exists and is not a gemma_jax checkpoint; refusing to overwrite it "
                            "(choose another path or delete it)")
    if not overwrite:
      raise CheckpointError(f"{path} exists; delete it or choose another path")
  check_params(config, params, where=f"saving {path}", adapters_only=base is not None)

  flat = flatten(params)
  sums = {}
  for group in sorted(params):  # one group at a time bounds the device copy of numpy parameters
    sums.update({f"{group}/{k}": v for k, v in integrity.fingerprints(params[group]).items()})
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
      "checksum_algorithm": integrity.ALGORITHM,
      "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v), "checksum": sums[k]}
                  for k, v in sorted(flat.items())},
      "provenance": {"gemma_jax_version": version(),
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     **(provenance or {})},
      "extra": extra or {},
  }
  if base is not None:
    metadata["base"] = dict(base)
  try:
    meta_bytes = json.dumps(metadata, indent=2, allow_nan=False).encode()
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"saving {path}: metadata is not JSON-serializable ({e})") from None

  parent = os.path.dirname(path)
  tmp = temp_path(path, random_suffix(shared=True))
  integrity.quiet_enter()  # orbax logs each failed write thread's traceback; we report the failure once
  try:
    if _is_primary():
      os.makedirs(parent, exist_ok=True)
      os.makedirs(tmp)
    _sync(f"gemma_jax_save_mkdir:{tmp}")
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=COMPRESS))
    for group in sorted(params):
      # One orbax item per top-level group: orbax stages a host copy of what it writes, so this bounds the
      # extra memory by the largest group (measured in benchmarks/convert_memory.py).
      ckptr.save(os.path.join(tmp, PARAMS_DIR, group), args=ocp.args.PyTreeSave(params[group]))
    if _is_primary():
      if tokenizer is not None:
        fsync_write(os.path.join(tmp, TOKENIZER_FILE), tokenizer.model_proto)
      fsync_write(os.path.join(tmp, METADATA_FILE), meta_bytes)
      fsync_write(os.path.join(tmp, COMPLETE_FILE), f"{FORMAT} checkpoint, written completely\n".encode())
    _sync(f"gemma_jax_save_written:{tmp}")
    if _is_primary():
      move_into_place(tmp, path)
    _sync(f"gemma_jax_save_done:{tmp}")
  except BaseException as e:  # KeyboardInterrupt too: leave nothing half-written behind
    if _is_primary():
      shutil.rmtree(tmp, ignore_errors=True)
    reason = integrity.storage_failure(e) if isinstance(e, Exception) else None
    if reason is None:
      raise
    kept = (f"the checkpoint already at {path} is intact" if existed and os.path.isdir(path)
            else f"nothing was written to {path}")
    todo = "free some space" if "No space left" in reason else "fix that"
    raise CheckpointError(f"saving {path} failed: {reason}; the partial copy was removed and {kept}; {todo} "
                          "and save again") from None
  finally:
    integrity.quiet_exit()


_OURS = {METADATA_FILE, PARAMS_DIR, TOKENIZER_FILE, COMPLETE_FILE}


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
  """Clears what interrupted `save`s (kill -9, power loss) left in `directory`; returns what it did.

  `<name>.tmp-XXXXXXXX` (a save that never finished) is removed; `<name>.old-XXXXXXXX` (the previous copy,
  moved aside just before the new one took its place) is removed when `<name>` is a complete checkpoint, and
  renamed back to `<name>` when the kill came between the two renames and it is the only complete copy.
  Only directories holding nothing but checkpoint files are touched. Call it when no save into `directory`
  can be in flight (the training loop holds its workdir lock), on one process.
  """
  directory = os.fspath(directory)
  done = []
  try:
    names = sorted(os.listdir(directory))
  except FileNotFoundError:
    return done
  for entry in names:
    m = STALE.match(entry)
    full = os.path.join(directory, entry)
    if not m or os.path.islink(full) or not os.path.isdir(full) or not set(os.listdir(full)) <= _OURS:
      continue
    target = os.path.join(directory, m.group("name"))
    if m.group("kind") == "old" and not os.path.lexists(target) and is_checkpoint(full):
      os.rename(full, target)
      done.append(f"restored {target} from {full}")
    else:
      shutil.rmtree(full)
      done.append(f"removed {full}")
  return done


# ---------------------------------------------------------------------------------------------------------
# Load


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of a complete checkpoint, without touching the parameters (CheckpointError otherwise).

  Checked: it parses, the format version, and the type of every entry `load` reads (config, tensors with
  their shapes / dtypes / checksums, tokenizer, template, kind).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory")
  md_path = os.path.join(path, METADATA_FILE)
  if not looks_native(path):
    if os.path.isdir(path) and os.path.isfile(md_path) and ours_but_damaged(path):
      if "format" not in parse_metadata(md_path):  # raises for a metadata.json that does not parse
        raise damaged(md_path, "no 'format' entry")
    _raise_not_native(path)
  if not os.path.isfile(os.path.join(path, COMPLETE_FILE)):
    raise CheckpointError(f"{path}: incomplete gemma_jax checkpoint (no {COMPLETE_FILE} marker: its save was "
                          "interrupted); delete it and save or convert again")
  metadata = parse_metadata(md_path)
  found = metadata.get("format_version")
  if not isinstance(found, int) or isinstance(found, bool) or found < 1:
    raise damaged(md_path, f"invalid format_version {found!r}, expected a positive integer")
  if found > FORMAT_VERSION:
    raise CheckpointError(f"{path}: checkpoint format version {found!r} is newer than this gemma_jax "
                          f"({version()}, format {FORMAT_VERSION}) reads; upgrade gemma_jax")
  check_metadata(md_path, metadata)
  return metadata


def _raise_not_native(path: str) -> None:
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
         mesh: jax.sharding.Mesh | None = None, dtype: str | None = None, verify: bool = True,
         base: str | None = None) -> Checkpoint:
  """Reads a checkpoint written by `save`.

  base: for an adapter checkpoint, the base checkpoint's path when it is not where the metadata says.

  sharding: a ShardingContext (or a Mesh; `mesh=` says the same): each device restores only its shard of
  every parameter, placed by `param_shardings(config, ctx)`; None: the parameters land on the first local
  device. dtype: cast the parameters on restore ("float32", "bfloat16", ...); the config's param_dtype follows.
  verify: check every tensor against its saved checksum, on the restored arrays where they live (no host
  gathers one); checkpoints saved before checksums existed load unverified. A damaged tensor or file is one
  CheckpointError line naming it.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  metadata = read_metadata(path)
  md_path = os.path.join(path, METADATA_FILE)
  config = config_from(md_path, metadata["config"])
  if dtype is not None:
    if dtype not in DTYPES:
      raise CheckpointError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    config = config.replace(param_dtype=dtype)

  shapes = param_shapes(config)
  base_ref = metadata.get("base")
  if base_ref is not None:
    shapes = lora.split(shapes)[1]
  saved = metadata["tensors"]
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
    if base_ref is not None:
      shardings = lora.split(shardings)[1]
  else:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, shapes)
  checked = verify and metadata.get("checksum_algorithm") is not None
  cast = None if dtype is None else jnp.dtype(dtype)
  # Verified checkpoints are restored as saved (the checksums are of those bits), then cast.
  restore_args = jax.tree.map(
      lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=tuple(s.shape),
                                         dtype=None if checked else cast),
      shapes, shardings)
  params_dir = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"{path}: the {PARAMS_DIR}/ directory is missing; the checkpoint is damaged")
  ckptr = ocp.PyTreeCheckpointer()
  params = {}
  with integrity.quiet_orbax():  # a damaged file fails many reads at once; say it once
    for group in sorted(restore_args):
      where = os.path.join(params_dir, group)
      try:
        tree = ckptr.restore(where, args=ocp.args.PyTreeRestore(restore_args=restore_args[group]))
      except Exception as e:  # orbax raises bare Exceptions around tensorstore's ValueErrors
        reason = integrity.storage_failure(e)
        if reason is None:
          raise
        raise CheckpointError(f"{where}: cannot restore the parameters ({reason}); the checkpoint is damaged; "
                              f"{REDO}") from None
      if checked:
        sums = {k[len(group) + 1:]: v["checksum"] for k, v in saved.items() if k.startswith(group + "/")}
        bad = integrity.first_mismatch(tree, sums)
        if bad is not None:
          raise CheckpointError(f"{where}: tensor {group}/{bad} does not match its saved checksum; the checkpoint "
                                f"is damaged; {REDO}")
        if cast is not None:
          tree = _cast(tree, cast, shardings[group])
      params[group] = tree

  tokenizer = None
  if metadata.get("tokenizer") is not None:
    try:
      tok_path = inside(path, metadata["tokenizer"], f"{md_path}: tokenizer")
    except UserError as e:
      raise CheckpointError(str(e)) from None
    if not os.path.isfile(tok_path):
      raise CheckpointError(f"{path}: {metadata['tokenizer']} is listed in the metadata but missing")
    tokenizer = Tokenizer(tok_path)
  if base_ref is not None:
    params = lora.attach(_load_base(path, base_ref, base, ctx, dtype, verify), params)
  return Checkpoint(config=config, params=params, tokenizer=tokenizer, template=metadata.get("template"),
                    kind=metadata.get("kind"), metadata=metadata, path=path)


def _load_base(path: str, ref: Any, override: str | None, ctx, dtype: str | None, verify: bool) -> Params:
  """The base parameters of the adapter checkpoint at `path`, after checking they are the ones it was trained on."""
  if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not isinstance(ref.get("hash"), str):
    raise damaged(os.path.join(path, METADATA_FILE), "'base' must be {\"path\": ..., \"hash\": ...}")
  where = override or ref["path"]
  if not os.path.isdir(where):
    raise CheckpointError(f"{path} holds adapters for the base checkpoint {ref['path']}, which is not there; "
                          "pass its new location (--base=PATH)")
  found = base_hash(read_metadata(where))
  if found != ref["hash"]:
    raise CheckpointError(f"{path} holds adapters trained on another base: {where} has content hash {found[:12]}, "
                          f"the adapters expect {ref['hash'][:12]} ({ref['path']}); pass that base (--base=PATH)")
  return load(where, sharding=ctx, dtype=dtype, verify=verify).params


def _cast(tree: Params, dtype, shardings: Params) -> Params:
  if all(x.dtype == dtype for x in jax.tree.leaves(tree)):
    return tree
  return jax.jit(lambda t: jax.tree.map(lambda x: x.astype(dtype), t), out_shardings=shardings)(tree)
