"""What every importer returns (a model ready to save in our format or to run), and reading JSON side files."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import TransformerConfig
from gemma_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Imported:
  """A model read from some source format.

  config: the model config; params: our parameter tree (numpy or jax arrays, official Flax names);
  tokenizer: when the source carries one; chat_template: the source's chat template text (e.g. HF Jinja),
  if any; kind: "pt" (pretrained), "it" (instruction-tuned) or None when the source does not say;
  source: provenance (format, path, anything useful), saved into our metadata.
  """

  config: TransformerConfig
  params: dict[str, Any]
  tokenizer: Tokenizer | None = None
  chat_template: str | None = None
  kind: Literal["pt", "it"] | None = None
  source: dict[str, Any] = dataclasses.field(default_factory=dict)


def read_json_object(path: str) -> dict[str, Any]:
  """The JSON object in `path` (config.json, an index, ...), or a one-line CheckpointError naming the file."""
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except IsADirectoryError:
    raise CheckpointError(f"{path}: a directory, not a JSON file") from None
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
  except RecursionError:  # json recurses once per nesting level
    raise CheckpointError(f"{path}: JSON nested too deeply to read; re-download the file") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON (line {e.lineno}: {e.msg})") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); re-download the file") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {_json_type(d)}")
  return d


def _json_type(v: Any) -> str:
  return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
          type(None): "null"}.get(type(v), type(v).__name__)
