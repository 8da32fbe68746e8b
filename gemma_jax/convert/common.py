"""What every importer returns: a model ready to save in our format or to run."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

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
