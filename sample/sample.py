"""Samples continuations from a gemma_jax checkpoint (default: the real Gemma 3 270M, greedy).

    python -m sample.sample                                     # "The capital of France is" -> continuation
    python -m sample.sample --ckpt=/tmp/run/final --prompt="Why is the sky blue?" --template=auto
    python -m sample.sample --prompts_file=prompts.txt --temperature=0.8 --top_p=0.95 --output_format=jsonl

The continuation alone goes to stdout (one per prompt, or one JSON object per line with
`--output_format=jsonl`); what was loaded, the template, warnings and timings go to stderr. Library logs
(orbax, jax) go to ~/.cache/gemma_jax/logs/sample.log ($GEMMA_JAX_CACHE/logs); `--verbosity=1` shows them
on stderr too. `--template=auto` uses the checkpoint's saved chat template for
an instruction-tuned checkpoint and plain completion for a pretrained (PT) one; `none` is plain completion
(BOS + text); a name (gemma, gemma3, gemma4) forces that template. `--temperature=0` is greedy.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from sample import common_flags

DEFAULT_PROMPT = "The capital of France is"

_PROMPT = flags.DEFINE_string("prompt", None, f"The prompt. Default: {DEFAULT_PROMPT!r}.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line (blank lines "
                                    "are skipped); replaces --prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Most tokens to generate per prompt.")
_STOP_TOKENS = flags.DEFINE_list("stop_tokens", [], "Extra stop tokens, as ids or pieces (eos and "
                                 "<end_of_turn> always stop).")
_TEMPLATE = flags.DEFINE_string("template", "auto", "auto | none | a template name (gemma, gemma3, gemma4).")
_FORMAT = flags.DEFINE_enum("output_format", "text", ["text", "jsonl"], "stdout format.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts sampled together.")
_STREAM = flags.DEFINE_boolean("stream", False, "Print text as it is generated (text format, one prompt).")
flags.adopt_module_key_flags(common_flags)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from gemma_jax import console
  from gemma_jax.errors import run_main
  console.setup(console.log_path("sample"))
  run_main(_run)


def pt_completion_warning(family_template: str) -> str:
  """The one line said when `--template=auto` samples a PT checkpoint: plain completion, not an answer."""
  return ("this is a pretrained (PT) checkpoint doing plain completion: it continues the text, it does not "
          "answer it. To chat, use an instruction-tuned (IT) checkpoint or fine-tune this one with the chat "
          f"template; --template={family_template} forces the template, --template=none silences this.")


def _read_prompts() -> list[str]:
  from gemma_jax.errors import UserError
  if _PROMPTS_FILE.value is not None:
    if _PROMPT.value is not None:
      raise UserError("give --prompt or --prompts_file, not both")
    try:
      with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
        prompts = [line.rstrip("\r\n") for line in f]
    except OSError as e:
      raise UserError(f"{_PROMPTS_FILE.value}: cannot read the prompts file ({e.strerror})") from None
    except UnicodeDecodeError as e:
      raise UserError(f"{_PROMPTS_FILE.value}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
      raise UserError(f"{_PROMPTS_FILE.value}: no prompts (write one prompt per line)")
    return prompts
  return [DEFAULT_PROMPT if _PROMPT.value is None else _PROMPT.value]


def _run():
  import gemma_jax
  from gemma_jax.sampling.chat import check_system, pt_warning
  from gemma_jax.sampling.stopping import parse_stop_tokens, stop_ids_for
  from gemma_jax.templates import render_prompts

  common_flags.check_template(_TEMPLATE.value)
  sampling = common_flags.sampling_params()
  max_new = common_flags.require_positive(_MAX_NEW)
  batch_size = common_flags.require_positive(_BATCH)
  prompts = _read_prompts()
  logging.info("gemma_jax %s", gemma_jax.__version__)
  ck, sampler, template = common_flags.load(_TEMPLATE.value)
  tok = sampler.tokenizer
  if common_flags.SYSTEM.value:  # plain completion would drop it silently
    check_system(template, common_flags.SYSTEM.value, tok, what="--system")
  if template is None:
    if ck.kind == "pt" and _TEMPLATE.value == "auto":  # chat-like prompts get a continuation: say so
      from gemma_jax.templates import template_for_family
      logging.warning(pt_completion_warning(template_for_family(ck.config.family).name))
    else:
      logging.info("plain completion (BOS + prompt text)%s", " of a PT checkpoint" if ck.kind == "pt" else "")
  else:
    logging.info("chat template %r", template.name)
    if pt_warning(ck.kind):
      logging.warning(pt_warning(ck.kind))
  rows = render_prompts(template, prompts, tok, system=common_flags.SYSTEM.value)
  stop_ids = stop_ids_for(template, tok, parse_stop_tokens(_STOP_TOKENS.value, tok))

  stream = _STREAM.value and _FORMAT.value == "text" and len(prompts) == 1
  for b0 in range(0, len(rows), batch_size):
    batch = rows[b0:b0 + batch_size]
    on_text = (lambda i, d: (sys.stdout.write(d), sys.stdout.flush())) if stream else None
    results = sampler.generate(batch, max_new_tokens=max_new, sampling=sampling, stop_ids=stop_ids,
                               stop_strings=common_flags.STOP.value, on_text=on_text,
                               batch_size=min(batch_size, len(rows)))  # a short last batch: padded
    t = sampler.last_timing
    logging.info("batch of %d: prefill %.2fs, %d decode steps in %.2fs", len(batch), t.get("prefill_s", 0),
                 t.get("decode_steps", 0), t.get("decode_s", 0))
    for i, r in enumerate(results):
      if _FORMAT.value == "jsonl":
        print(json.dumps({"prompt": prompts[b0 + i], "completion": r.text, "tokens": r.tokens,
                          "prompt_tokens": r.prompt_tokens, "stop_reason": r.stop_reason,
                          "stop_id": r.stop_id, "stop_string": r.stop_string}, ensure_ascii=False))
      elif stream:
        print()
      else:
        print(r.text)
    sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
