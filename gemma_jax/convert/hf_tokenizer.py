"""The tokenizer files of an HF export: tokenizer.json (HF `tokenizers`), tokenizer_config.json,
special_tokens_map.json, chat_template.jinja; what the released Gemma repos carry, so that a plain
transformers install (no sentencepiece, no protobuf) loads the export.

    write_tokenizer_files(dir, tokenizer, chat_template, max_len)

tokenizer.json is a BPE model built from the SentencePiece pieces the way transformers' GemmaConverter does:
vocab = pieces by id, merges = every split of a normal piece into two pieces, ranked by the merged piece's
score (SentencePiece's BPE merges the highest-scoring pair first), byte fallback, spaces as "▁", the control
pieces as special added tokens and the user-defined ones (`<start_of_turn>`, runs of newlines) as added
tokens matched whole. It encodes like SentencePiece, except that control pieces written as text (`<bos>`)
become their ids, as in the released repos.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gemma_jax.errors import UserError
from gemma_jax.tokenizer import TURN_MARKERS, Tokenizer

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _proto(tokenizer: Tokenizer):
  from sentencepiece import sentencepiece_model_pb2 as pb
  m = pb.ModelProto()
  m.ParseFromString(tokenizer.model_proto)
  return m


def _check_supported(m) -> None:
  """Gemma's SentencePiece settings are the only ones the pipeline below reproduces."""
  ns, ts = m.normalizer_spec, m.trainer_spec
  unsupported = []
  if ts.model_type != 2:
    unsupported.append("model_type is not BPE")
  if ns.precompiled_charsmap:
    unsupported.append(f"normalization rule {ns.name!r}")
  if ns.add_dummy_prefix:
    unsupported.append("add_dummy_prefix")
  if ns.remove_extra_whitespaces:
    unsupported.append("remove_extra_whitespaces")
  if not ns.escape_whitespaces:
    unsupported.append("no whitespace escaping")
  if unsupported:
    raise UserError("tokenizer.json: cannot reproduce this SentencePiece model in HF tokenizers ("
                    + ", ".join(unsupported) + "); Gemma's tokenizers are BPE, identity normalization, no dummy "
                    "prefix")


def build_hf_tokenizer(tokenizer: Tokenizer):
  """A `tokenizers.Tokenizer` that encodes like `tokenizer` (SentencePiece), with BOS added by its
  post-processor (transformers' add_bos_token)."""
  from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers.models import BPE

  m = _proto(tokenizer)
  _check_supported(m)
  pieces = [(p.piece, p.score, p.type) for p in m.pieces]
  names = [p for p, _, _ in pieces]
  if "\t" not in names and "<0x09>" in names:  # old Gemma vocabularies: tab only as a byte piece; SentencePiece
    names[names.index("<0x09>")] = "\t"        # still merges a tab by its text, so the piece needs the name
  vocab = {n: i for i, n in enumerate(names)}
  if len(vocab) != len(names):
    raise UserError("tokenizer.json: the SentencePiece model has duplicate pieces")
  # Merges into normal pieces only (SentencePiece never merges into control / byte pieces; user-defined ones are
  # matched whole before BPE). Rank: highest score first, then id; several splits of one piece: by their ids.
  ranked = []
  for i, (_, score, kind) in enumerate(pieces):
    if kind != _NORMAL:
      continue
    n = names[i]
    for k in range(1, len(n)):
      left, right = n[:k], n[k:]
      if left in vocab and right in vocab:
        ranked.append((-score, i, vocab[left], vocab[right], left, right))
  ranked.sort()
  merges = [(left, right) for *_, left, right in ranked]
  hf = HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token=names[tokenizer.special.unk], fuse_unk=True,
                       byte_fallback=True, dropout=None))
  hf.normalizer = normalizers.Replace(" ", "▁")
  hf.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
  hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
  specials = {m for pair in TURN_MARKERS.values() for m in pair}  # GemmaConverter: the turn markers are special
  # User-defined pieces are matched on the normalized text, as SentencePiece's prefix matcher does ("  " is
  # "▁▁"); control pieces on the raw text.
  added = [AddedToken(names[i], normalized=kind == _USER_DEFINED,
                      special=kind in (_CONTROL, _UNKNOWN) or names[i] in specials)
           for i, (_, _, kind) in enumerate(pieces) if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)]
  hf.add_tokens(added)  # already in the vocab: they keep their ids
  bos = names[tokenizer.special.bos]
  hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                    special_tokens=[(bos, tokenizer.special.bos)])
  return hf


def _added_tokens_decoder(hf) -> dict[str, Any]:
  return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                   "single_word": t.single_word, "special": t.special}
          for i, t in sorted(hf.get_added_tokens_decoder().items())}


def write_tokenizer_files(path: str, tokenizer: Tokenizer, chat_template: str | None,
                          max_len: int) -> None:
  """Writes tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json (and
  chat_template.jinja when there is a template) into the directory `path`. max_len: model_max_length."""
  hf = build_hf_tokenizer(tokenizer)
  tokenizer.save(os.path.join(path, "tokenizer.model"))
  hf.save(os.path.join(path, "tokenizer.json"))
  sp = tokenizer.special
  piece = tokenizer.id_to_piece
  tokens = {"bos_token": piece(sp.bos), "eos_token": piece(sp.eos), "unk_token": piece(sp.unk),
            "pad_token": piece(sp.pad)}
  extra = [t for pair in TURN_MARKERS.values() for t in pair if tokenizer.piece_to_id(t) != sp.unk]
  if tokenizer.piece_to_id("<mask>") != sp.unk:
    tokens["mask_token"] = "<mask>"
  tc: dict[str, Any] = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                        **tokens, "mask_token": tokens.get("mask_token"), "extra_special_tokens": extra,
                        "added_tokens_decoder": _added_tokens_decoder(hf),
                        "model_max_length": max_len, "padding_side": "left", "clean_up_tokenization_spaces": False,
                        "spaces_between_special_tokens": False}
  if chat_template is not None:
    tc["chat_template"] = chat_template  # transformers 4 reads it here, 5 also from chat_template.jinja
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write(chat_template)
  _dump_json(os.path.join(path, "tokenizer_config.json"), tc)
  _dump_json(os.path.join(path, "special_tokens_map.json"), {**tokens, "additional_special_tokens": extra})


def _dump_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")
