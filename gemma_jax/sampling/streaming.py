"""Incremental detokenization: text deltas as tokens arrive, never a broken multi-byte character.

SentencePiece models with byte fallback spell rare characters as several byte pieces (`<0xE6><0xBC><0xA2>`
is one CJK character). Decoding a prefix that ends inside such a character gives U+FFFD; the decoder holds
those bytes back until the character is complete (or until `flush`).
"""

from __future__ import annotations

from typing import Sequence

from gemma_jax.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
  """Feed ids with `push(ids) -> new text`; `flush()` returns whatever is still held back.

  Only a short suffix of the ids is decoded each time (from `prefix`, a point a few tokens back), so the
  cost per token does not grow with the length of the output; the text is the exact decode of all ids.
  """

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.prefix = 0  # ids[prefix:read] decode to text already emitted (a short context for the next decode)
    self.read = 0  # ids before `read` are emitted
    self.text = ""  # everything emitted so far

  def push(self, ids: Sequence[int]) -> str:
    self.ids.extend(int(i) for i in ids)
    before = self.tokenizer.decode(self.ids[self.prefix:self.read])
    now = self.tokenizer.decode(self.ids[self.prefix:])
    if len(now) <= len(before) or now.endswith(REPLACEMENT) or not now.startswith(before):
      return ""  # inside a multi-byte character (or nothing visible yet): wait for more ids
    delta = now[len(before):]
    self.prefix, self.read = self.read, len(self.ids)
    self.text += delta
    return delta

  def flush(self) -> str:
    """The rest (possibly ending in U+FFFD if the ids stop inside a character)."""
    before = self.tokenizer.decode(self.ids[self.prefix:self.read])
    now = self.tokenizer.decode(self.ids[self.prefix:])
    delta = now[len(before):] if now.startswith(before) else ""
    self.prefix = self.read = len(self.ids)
    self.text += delta
    return delta
