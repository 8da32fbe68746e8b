"""Validates a dataset and prints what training would see: counts, token lengths, truncations, drops.

    python -m gemma_jax.data.inspect prefs.jsonl                 # as `python -m train.train` would see it
    python -m gemma_jax.data.inspect prefs.jsonl --show=2        # and two examples, trained tokens in [[...]]
    python -m gemma_jax.data.inspect sft.jsonl --ckpt=/tmp/run/final --max_length=1024

The defaults are training's, with its default recipe (configs/orpo_gemma3_270m_cpu.py): the real Gemma 3
270M's tokenizer, the gemma3 template, max_length 256. `--ckpt=DIR` takes the tokenizer and chat template
saved in that checkpoint instead (what `--config.init_from=DIR` does). The kind, preference pairs or SFT
examples, is read from the records (`chosen`/`rejected`, or `messages`/`completion`); `--kind` forces it.
`--tokenizer`: `real`, a `tokenizer.model` file, a checkpoint directory holding one, or a `.gguf` file.

Every malformed record is listed as `FILE:LINE: what is wrong`. Without `--skip_invalid` the command then
fails (exit status 1) and prints nothing else; with it, they are skipped, counted, and the statistics follow.
A file that leaves no usable example fails after its statistics, with the message training gives.
`--show=N` prints the first N kept examples token for token as training sees them, each run of target tokens
inside [[...]]: with a chat template every reply must end `...<end_of_turn>]]`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags

from gemma_jax import cli
from gemma_jax.data.dataset import KINDS
from gemma_jax.errors import UserError, fail, run_main
from gemma_jax.templates import TEMPLATE_NAMES, ChatTemplate
from gemma_jax.tokenizer import Tokenizer

# What `python -m train.train` uses without --config (configs/orpo_gemma3_270m_cpu.py; a test keeps them equal).
DEFAULT_TEMPLATE = "gemma3"
DEFAULT_MAX_LENGTH = 256
DEFAULT_KIND = "preference"  # the data of its objective, ORPO
MARK = ("[[", "]]")  # around each run of target tokens (--show)

FLAGS = flags.FlagValues()  # this module's own: importing it defines nothing in absl's global FLAGS
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", *KINDS], "auto: from the records.", flag_values=FLAGS)
_CKPT = flags.DEFINE_string("ckpt", None, "A gemma_jax checkpoint whose tokenizer and template to use. "
                            "Default: the real Gemma 3 270M (training's default).", flag_values=FLAGS)
_TEMPLATE = flags.DEFINE_enum("template", None, list(TEMPLATE_NAMES), "Chat template. Default: the --ckpt's, "
                              f"else {DEFAULT_TEMPLATE}.", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "real | tokenizer.model | checkpoint dir | .gguf. Default: "
                                 "the --ckpt's, else the real Gemma 3 270M's.", flag_values=FLAGS)
_MAX_LENGTH = flags.DEFINE_integer("max_length", DEFAULT_MAX_LENGTH, "Tokens per row (prompt + response).",
                                   lower_bound=1, flag_values=FLAGS)
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_length", None, "Cut longer prompts to this many tokens.",
                                   flag_values=FLAGS)
_PROMPT_TRUNC = flags.DEFINE_enum("prompt_truncation", "keep_end", ["keep_end", "keep_start"],
                                  "Which end of a cut prompt is kept.", flag_values=FLAGS)
_RESPONSE_TRUNC = flags.DEFINE_enum("response_truncation", "drop", ["drop", "cut"],
                                    "A response that does not fit: drop the example, or cut the response.",
                                    flag_values=FLAGS)
_EOS_TARGET = flags.DEFINE_boolean("eos_target", None, "Also train eos after each reply (default: only for the "
                                   "completion template).", flag_values=FLAGS)
_TRAIN_ON = flags.DEFINE_enum("train_on", "all", ["all", "last"], "SFT messages: which replies are targets.",
                              flag_values=FLAGS)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Tokenize in this many processes.", lower_bound=0,
                                    flag_values=FLAGS)
_SKIP_INVALID = flags.DEFINE_boolean("skip_invalid", False, "Skip and count malformed records instead of "
                                     "failing.", flag_values=FLAGS)
_SHOW = flags.DEFINE_integer("show", 0, "Print this many examples, target tokens inside [[...]].",
                             lower_bound=0, flag_values=FLAGS)
_HELP = flags.DEFINE_boolean("help", False, "Show this help.", short_name="h", flag_values=FLAGS)

USAGE = "python -m gemma_jax.data.inspect FILE [--flags]; --help lists them"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`app.run`'s flags_parser: [program, FILE] -> ditto; a bad flag or argument is one `error:` line, status 2."""
  FLAGS.unparse_flags()  # each call starts from the defaults (tests parse several command lines)
  rest = cli.parse_flags(list(argv), FLAGS)
  if _HELP.value:
    print(__doc__ + "\nflags:\n" + FLAGS.module_help(FLAGS.find_module_defining_flag("kind")))
    raise SystemExit(0)
  if len(rest) != 2 or not rest[1]:
    fail(("no data file" if len(rest) < 2 or not rest[1] else f"one data file at a time, got {' '.join(rest[1:])}")
         + f": {USAGE}", cli.USAGE_STATUS)
  if not flags.FLAGS.is_parsed():  # absl's own flags (logging) keep their defaults; app.run needs them parsed
    flags.FLAGS.mark_as_parsed()
  return rest


def load_tokenizer(spec: str) -> Tokenizer:
  """`real`, a SentencePiece model file, a directory holding `tokenizer.model`, or a GGUF file."""
  if spec == "real":
    from gemma_jax.real_model import real_tokenizer
    return real_tokenizer()
  if os.path.isdir(spec):
    spec = os.path.join(spec, "tokenizer.model")
  if spec.lower().endswith(".gguf") and os.path.isfile(spec):
    from gemma_jax.convert.gguf import read_gguf_tokenizer
    return read_gguf_tokenizer(spec)
  if not os.path.exists(spec):
    raise UserError(f"--tokenizer={spec}: no such file; give 'real', a tokenizer.model, a checkpoint dir or a .gguf")
  return Tokenizer(spec)


def resolve(ckpt: str | None, template: str | None, tokenizer: str | None) -> tuple[ChatTemplate, Tokenizer, str]:
  """The template and tokenizer training would use (`start.resolve_start`'s rules), and the tokenizer's name."""
  from gemma_jax.templates import get_template, template_for_family
  if not ckpt:
    return (get_template(template or DEFAULT_TEMPLATE), load_tokenizer(tokenizer or "real"),
            f"--tokenizer={tokenizer}" if tokenizer else "the real Gemma 3 270M's tokenizer")
  from gemma_jax.checkpoint import read_metadata
  from gemma_jax.paths import inside
  meta = read_metadata(ckpt)  # CheckpointError (one line) for anything that is not a complete checkpoint
  if tokenizer:
    tok, name = load_tokenizer(tokenizer), f"--tokenizer={tokenizer}"
  elif meta.get("tokenizer"):
    tok, name = Tokenizer(inside(ckpt, meta["tokenizer"], f"--ckpt={ckpt}: tokenizer")), f"--ckpt={ckpt}'s tokenizer"
  else:
    raise UserError(f"--ckpt={ckpt}: the checkpoint has no tokenizer; give --tokenizer=PATH")
  if template:
    chat = get_template(template)
  elif meta.get("template"):
    chat = ChatTemplate.from_dict(meta["template"])
  else:
    chat = template_for_family(meta["config"]["family"])
  return chat, tok, name


def infer_kind(path: str) -> str:
  """"preference" when the first readable record with a telling field has chosen/rejected, "sft" when it has
  messages/completion; DEFAULT_KIND when none has (an empty file, say)."""
  from gemma_jax.data.records import Invalid, read_records
  for rec in read_records(path):
    if isinstance(rec, Invalid) or not isinstance(rec.data, dict):
      continue
    if "chosen" in rec.data or "rejected" in rec.data:
      return "preference"
    if "messages" in rec.data or "completion" in rec.data:
      return "sft"
  return DEFAULT_KIND


def marked_text(ids: Sequence[int], target: Sequence[bool], tokenizer: Tokenizer) -> str:
  """ids [T] as text, each run of target tokens (target [T]) inside MARK; special tokens spelled out."""
  sp = tokenizer.special
  sot, eot = tokenizer.turn_markers
  named = {sp.pad: "<pad>", sp.eos: "<eos>", sp.bos: "<bos>", sp.start_of_turn: sot,
           sp.end_of_turn: eot}  # by role: a tokenizer may spell its bos "<s>"
  specials = {i: piece for i, piece in named.items() if i is not None and i >= 0}
  out, start = [], 0
  for end in range(1, len(ids) + 1):
    if end == len(ids) or bool(target[end]) != bool(target[start]):
      text = _text([int(i) for i in ids[start:end]], tokenizer, specials)
      out.append(f"{MARK[0]}{text}{MARK[1]}" if target[start] else text)
      start = end
  return "".join(out)


def _text(ids: list[int], tokenizer: Tokenizer, specials: dict[int, str]) -> str:
  parts, run = [], []
  for i in ids + [None]:
    if (i is None or i in specials) and run:
      parts.append(tokenizer.decode(run))
      run = []
    if i in specials:
      parts.append(specials[i])
    elif i is not None:
      run.append(i)
  return "".join(parts)


def show_examples(data, tokenizer: Tokenizer, n: int) -> None:
  """The first n examples of `data` (a PreparedData) as rows of text with their targets marked."""
  import numpy as np
  shown = data.examples[:n]
  print(f"\n{len(shown)} example(s) as training sees them; target tokens inside {MARK[0]}...{MARK[1]}:")
  for ex in shown:
    if data.kind == "preference":
      rows = [(side, np.concatenate([ex.prompt, getattr(ex, side)]),
               np.concatenate([np.zeros(len(ex.prompt), bool), getattr(ex, f"{side}_target")]))
              for side in ("chosen", "rejected")]
    else:
      rows = [("row", ex.ids, ex.target)]
    for label, ids, target in rows:
      text = marked_text(ids, target, tokenizer)
      print(f"--- {ex.where} {label} ---\n{text}", end="" if text.endswith("\n") else "\n")


def main(argv: Sequence[str]) -> int:
  """argv: [program, FILE] with the flags parsed (`parse_flags`). UserError for what the user must fix."""
  from gemma_jax.data.dataset import InvalidRecordsError, no_examples_error, prepare_dataset
  from gemma_jax.data.truncation import LengthPolicy

  path = argv[1]
  policy = LengthPolicy(max_length=_MAX_LENGTH.value, max_prompt_length=_MAX_PROMPT.value,
                        prompt_truncation=_PROMPT_TRUNC.value, response_truncation=_RESPONSE_TRUNC.value)
  kind = infer_kind(path) if _KIND.value == "auto" else _KIND.value
  template, tokenizer, tokenizer_name = resolve(_CKPT.value, _TEMPLATE.value, _TOKENIZER.value)
  try:
    data = prepare_dataset(path, kind=kind, template=template, tokenizer=tokenizer, policy=policy,
                           skip_invalid=_SKIP_INVALID.value, eos_target=_EOS_TARGET.value,
                           train_on=_TRAIN_ON.value, max_listed=sys.maxsize, require_examples=False,
                           num_workers=_NUM_WORKERS.value, tokenizer_name=tokenizer_name)
  except InvalidRecordsError as e:
    for bad in e.invalid:
      print(bad, flush=True)
    raise UserError(f"{len(e.invalid)} malformed record(s) in {path}; fix them, or skip them with "
                    "--skip_invalid") from None
  for bad in data.invalid:
    print(bad)
  s = data.stats
  print(f"file: {path}")
  print(f"kind: {kind}{' (from the records)' if _KIND.value == 'auto' else ''}  template: {template.name}  "
        f"tokenizer: {tokenizer_name}")
  print(f"max_length: {policy.max_length}  max_prompt_length: {policy.max_prompt_length}  "
        f"prompt_truncation: {policy.prompt_truncation}  response_truncation: {policy.response_truncation}")
  print(f"records: {s.records}  valid: {s.records - s.invalid}  malformed (skipped): {s.invalid}")
  print(f"examples kept: {s.kept}  dropped: {s.dropped_prompt_too_long} (prompt does not fit), "
        f"{s.dropped_response_too_long} (response does not fit)")
  print(f"truncated: {s.truncated_prompts} prompts, {s.truncated_responses} responses (end_of_turn target cut)")
  qs = (50, 90, 95, 99, 100)
  print("token lengths " + " ".join(f"{'max' if q == 100 else f'p{q}':>7}" for q in qs))
  for name in s.lengths:
    pct = s.percentiles(name, qs)
    print(f"  {name:<11} " + " ".join(f"{pct[q]:>7}" for q in qs))
  if _SHOW.value and data.examples:
    show_examples(data, tokenizer, _SHOW.value)
  if not data.examples:  # training refuses such a file: so does its check
    sys.stdout.flush()
    raise no_examples_error(data)
  return 0


def _main(argv: Sequence[str]) -> int:
  from gemma_jax import console
  console.setup(console.log_path("inspect"))  # library lines (tokenizer, real-model cache) go to the file
  return run_main(main, argv)


if __name__ == "__main__":
  app.run(_main, flags_parser=parse_flags)
