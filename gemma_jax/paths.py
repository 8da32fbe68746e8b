"""Paths at the floor of the package: the cache directory, and names read from files kept inside their directory.

    inside(directory, name, what="metadata.json's tokenizer")  -> directory/name, or a UserError

A file that names another file (a checkpoint's tokenizer, an HF index's shard, a dataset's data file) is only
followed inside its own directory: an absolute name, `..` components, or a symlink that leads out are refused.
"""

from __future__ import annotations

import os

from gemma_jax.errors import UserError


def cache_dir() -> str:
  """`$GEMMA_JAX_CACHE`, else `~/.cache/gemma_jax`."""
  return os.path.expanduser(os.environ.get("GEMMA_JAX_CACHE") or os.path.join("~", ".cache", "gemma_jax"))


def inside(directory: str | os.PathLike, name: object, what: str) -> str:
  """`directory/name` when `name` is a relative path that stays inside `directory` (symlinks resolved).

  what: who named the file, for the error ("metadata.json's tokenizer entry").
  Raises UserError for a non-string, empty, absolute or escaping name.
  """
  directory = os.fspath(directory)
  if not isinstance(name, str) or not name:
    raise UserError(f"{what}: expected a file name inside {directory}, got {name!r}")
  if os.path.isabs(name) or "\x00" in name:
    raise UserError(f"{what}: {name!r} is not a relative name inside {directory}; refusing to follow it")
  root = os.path.realpath(directory)
  target = os.path.realpath(os.path.join(root, name))
  if os.path.commonpath([root, target]) != root:
    raise UserError(f"{what}: {name!r} leads outside {directory}; refusing to follow it")
  return os.path.join(directory, name)
