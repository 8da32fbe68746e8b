"""SentencePiece tokenizer with each Gemma family's special ids.

The special ids are read from the vocabulary itself (`<start_of_turn>` is 106 in Gemma 1/2 and 105 in
Gemma 3), so the same wrapper serves every family and the tiny test models. Gemma 4's vocabulary (tokenizer v4)
writes its turn markers `<|turn>` (105) and `<turn|>` (106): `special.start_of_turn` / `end_of_turn` are the
ids of whichever pair the vocabulary has, and `turn_markers` their text.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import sentencepiece as spm

from gemma_jax.errors import UserError

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_OF_TURN_V4, END_OF_TURN_V4 = "<|turn>", "<turn|>"  # Gemma 4
TURN_MARKERS = {"v3": (START_OF_TURN, END_OF_TURN), "v4": (START_OF_TURN_V4, END_OF_TURN_V4)}


def _reason(e: Exception) -> str:
  """sentencepiece's internal error ("INTERNAL: src/sentencepiece_processor.cc(109) [model_proto->Parse...")
  in words."""
  text = str(e).strip()
  if "ParseFromArray" in text:
    return "the protobuf does not parse"
  text = re.sub(r"^[A-Z_]+: (src/\S+\(\d+\) )?", "", text.splitlines()[0] if text else type(e).__name__)
  return text[:200]


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int
  eos: int
  bos: int
  unk: int
  start_of_turn: int | None
  end_of_turn: int | None


class Tokenizer:
  """Wraps a SentencePiece model (given as bytes or a path).

  `encode` never adds BOS unless asked (`add_bos=True`): rendered chat text already carries its single
  BOS id, added by the template, so a second one can never slip in.
  """

  def __init__(self, model: bytes | str | os.PathLike):
    where = f"tokenizer model ({len(model)} bytes)" if isinstance(model, (bytes, bytearray)) else None
    if isinstance(model, (str, os.PathLike)):
      where = os.fspath(model)
      try:
        with open(where, "rb") as f:
          model = f.read()
      except OSError as e:
        raise UserError(f"{where}: cannot read the tokenizer model ({e.strerror})") from None
    self.model_proto: bytes = bytes(model)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self.model_proto)
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError
      raise UserError(f"{where or 'tokenizer model'}: not a SentencePiece model ({_reason(e)})") from None
    self.turn_format = next((f for f, (a, b) in TURN_MARKERS.items()
                             if self._piece_id(a) is not None and self._piece_id(b) is not None), None)
    start, end = TURN_MARKERS[self.turn_format or "v3"]
    self.special = SpecialIds(
        pad=self._sp.pad_id(), eos=self._sp.eos_id(), bos=self._sp.bos_id(), unk=self._sp.unk_id(),
        start_of_turn=self._piece_id(start), end_of_turn=self._piece_id(end))

  @property
  def turn_markers(self) -> tuple[str, str]:
    """The text of the vocabulary's turn markers: ("<start_of_turn>", "<end_of_turn>") or Gemma 4's."""
    return TURN_MARKERS[self.turn_format or "v3"]

  def _piece_id(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() else i

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Text to ids. Special tokens written in text (`<end_of_turn>`) become their single ids."""
    ids = list(self._sp.encode(text))
    if add_bos:
      ids.insert(0, self.special.bos)
    if add_eos:
      ids.append(self.special.eos)
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
      f.write(self.model_proto)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Tokenizer) and self.model_proto == other.model_proto

  def __hash__(self) -> int:
    return hash(self.model_proto)
