"""Chats with a gemma_jax checkpoint in the terminal; the KV cache carries over turns.

    python -m sample.chat --ckpt=/tmp/run/final            # an instruction-tuned (IT) checkpoint
    python -m sample.chat                                  # the real Gemma 3 270M (PT: it warns, see below)

Type a message and press enter; `/reset` starts a new conversation, `/quit` (or end of input) leaves.
Replies stream to stdout; logs go to stderr. The checkpoint's saved chat template is used
(`--template=auto`); another name warns, or fails with `--strict_template`. A pretrained (PT) checkpoint
has never seen the chat template: it prints a warning and continues text instead of answering.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

_CKPT = flags.DEFINE_string("ckpt", None, "Checkpoint directory (our format). Default: the real Gemma 3 270M.")
_TEMPLATE = flags.DEFINE_string("template", "auto", "auto (the checkpoint's) | a template name (gemma, gemma3).")
_STRICT = flags.DEFINE_boolean("strict_template", False, "Fail when --template differs from the checkpoint's.")
_SYSTEM = flags.DEFINE_string("system", None, "A system message (templates that support one).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens per reply.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Relative probability floor (0 = off).")
_REP = flags.DEFINE_float("repetition_penalty", 1.0, "Penalty for repeated tokens (1 = off).")
_PRESENCE = flags.DEFINE_float("presence_penalty", 0.0, "Subtracted from generated tokens' logits (0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "A stop string (repeatable).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Cast the parameters (default: as saved).")
_MESH = flags.DEFINE_string("mesh", None, "Shard over devices, e.g. 'fsdp:-1'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from gemma_jax.errors import run_main
  run_main(_run)


def _run():
  from gemma_jax.errors import UserError
  from gemma_jax.sampling import SamplingParams
  from gemma_jax.sampling.chat import ChatSession, resolve_template
  from gemma_jax.sampling.loading import load_sampler

  sampling = SamplingParams(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                            min_p=_MIN_P.value, repetition_penalty=_REP.value,
                            presence_penalty=_PRESENCE.value, seed=_SEED.value)
  if _MAX_NEW.value < 1:
    raise UserError(f"--max_new_tokens={_MAX_NEW.value}: must be >= 1")
  ck, sampler = load_sampler(_CKPT.value, dtype=_DTYPE.value, mesh=_MESH.value)
  template = resolve_template(_TEMPLATE.value, ck.template, ck.config.family, kind=ck.kind,
                              strict=_STRICT.value, for_chat=True)
  session = ChatSession(sampler, template, system=_SYSTEM.value, sampling=sampling,
                        max_new_tokens=_MAX_NEW.value, stop_strings=tuple(_STOP.value), kind=ck.kind)
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
