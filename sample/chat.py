"""Chats with a gemma_jax checkpoint in the terminal; the KV cache carries over turns.

    python -m sample.chat --ckpt=/tmp/run/final            # an instruction-tuned (IT) checkpoint
    python -m sample.chat                                  # the real Gemma 3 270M (PT: it warns, see below)

Type a message and press enter; `/reset` starts a new conversation, `/quit` (or end of input) leaves.
Replies stream to stdout; what was loaded and warnings go to stderr (library logs to
~/.cache/gemma_jax/logs/chat.log, on stderr too with `--verbosity=1`). The checkpoint's saved chat template is used
(`--template=auto`); another name warns, or fails with `--strict_template`. A pretrained (PT) checkpoint
has never seen the chat template: it prints a warning and continues text instead of answering.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from sample import common_flags

_TEMPLATE = flags.DEFINE_string("template", "auto", "auto (the checkpoint's) | a template name (gemma, gemma3, gemma4).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens per reply.")
flags.adopt_module_key_flags(common_flags)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from gemma_jax import console
  from gemma_jax.errors import run_main
  console.setup(console.log_path("chat"))
  run_main(_run)


def _run():
  from gemma_jax.errors import UserError
  from gemma_jax.sampling.chat import ChatSession, check_system

  sampling = common_flags.sampling_params()
  max_new = common_flags.require_positive(_MAX_NEW)
  common_flags.check_template(_TEMPLATE.value, for_chat=True)
  ck, sampler, template = common_flags.load(_TEMPLATE.value, for_chat=True)
  if common_flags.SYSTEM.value:  # before the first turn, not at every one
    check_system(template, common_flags.SYSTEM.value, sampler.tokenizer, what="--system")
  session = ChatSession(sampler, template, system=common_flags.SYSTEM.value, sampling=sampling,
                        max_new_tokens=max_new, stop_strings=tuple(common_flags.STOP.value), kind=ck.kind)
  interactive = sys.stdin.isatty()
  if interactive:
    print("chat: type a message; /reset for a new conversation, /quit to leave", file=sys.stderr)
  while True:
    if interactive:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
      break
    text = line.strip()
    if not text:
      continue
    if text == "/quit":
      break
    if text == "/reset":
      session.reset()
      logging.info("conversation reset")
      continue
    try:
      session.send(text, on_text=lambda d: (sys.stdout.write(d), sys.stdout.flush()))
    except UserError as e:  # e.g. the context is full: say so and keep the REPL alive
      print(f"error: {e} (type /reset to start over)", file=sys.stderr, flush=True)
      session.reset()
      continue
    print(flush=True)
    logging.info("reply: %d tokens, stop: %s", len(session.last.tokens), session.last.stop_reason)


if __name__ == "__main__":
  app.run(main)
