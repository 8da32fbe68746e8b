"""The flags and helpers that `sample.sample` and `sample.chat` share: checkpoint, sampling, stop strings, template.

A script imports this module and calls `flags.adopt_module_key_flags(common_flags)` so that `--help` lists
these flags with its own. Flags whose default or help differ per script (`--max_new_tokens`, `--template`)
stay in the scripts.
"""

from __future__ import annotations

from absl import flags

CKPT = flags.DEFINE_string("ckpt", None, "Checkpoint directory (our format). Default: the real Gemma 3 270M.")
BASE = flags.DEFINE_string("base", None, "An adapter (LoRA) checkpoint's base model, when it is not where the "
                           "adapters' metadata says.")
DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Cast the parameters (default: as saved).")
MESH = flags.DEFINE_string("mesh", None, "Shard over devices, e.g. 'fsdp:-1' or 'data:2,tensor:4'.")
STRICT_TEMPLATE = flags.DEFINE_boolean("strict_template", False,
                                       "Fail when --template differs from the checkpoint's.")
SYSTEM = flags.DEFINE_string("system", None, "A system message (chat templates that support one).")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set reaching this mass (1 = off).")
MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p times the best token's probability (0 = off).")
REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0,
                                        "Penalty for tokens of the prompt and output (1 = off).")
PRESENCE_PENALTY = flags.DEFINE_float("presence_penalty", 0.0,
                                      "Subtracted from the logit of generated tokens (0 = off).")
SEED = flags.DEFINE_integer("seed", 0, "Random seed (same seed, same samples).")
STOP = flags.DEFINE_multi_string("stop", [], "A stop string (repeatable); the output ends before it.")


def sampling_params():
  """The `SamplingParams` of the sampling flags; UserError naming the flag for a bad (NaN, infinite,
  out-of-range) value."""
  from gemma_jax.errors import UserError
  from gemma_jax.sampling import SamplingParams
  from gemma_jax.sampling.strategies import SamplingOptionError
  try:
    return SamplingParams(temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value,
                          min_p=MIN_P.value, repetition_penalty=REPETITION_PENALTY.value,
                          presence_penalty=PRESENCE_PENALTY.value, seed=SEED.value)
  except SamplingOptionError as e:  # the option's name is the flag's
    raise UserError(f"--{e.field}={e.value}: {e.why}") from None


def check_template(value: str, *, for_chat: bool = False) -> None:
  """UserError for a --template that names no template, before the checkpoint is loaded."""
  from gemma_jax.errors import UserError
  from gemma_jax.templates import TEMPLATE_NAMES
  chat_names = [n for n in TEMPLATE_NAMES if n != "completion"]
  if for_chat and value in ("none", "completion"):
    raise UserError(f"--template={value}: chat needs a chat template with turns; use auto or one of "
                    f"{', '.join(chat_names)} (plain completion: python -m sample.sample --template=none)")
  if value not in ("auto", "none", *TEMPLATE_NAMES):
    names = chat_names if for_chat else ["none", *TEMPLATE_NAMES]
    raise UserError(f"--template={value}: not a chat template; use auto or one of {', '.join(names)}")


def require_positive(flag: flags.FlagHolder[int]) -> int:
  """The flag's value; UserError unless it is >= 1."""
  from gemma_jax.errors import UserError
  if flag.value < 1:
    raise UserError(f"--{flag.name}={flag.value}: must be >= 1")
  return flag.value


def load(template: str, *, for_chat: bool = False):
  """(Checkpoint, Sampler, Template or None) of --ckpt, --dtype, --mesh; `template` resolved against the saved one."""
  from gemma_jax.sampling.chat import resolve_template
  from gemma_jax.sampling.loading import load_sampler
  ck, sampler = load_sampler(CKPT.value, dtype=DTYPE.value, mesh=MESH.value, base=BASE.value)
  resolved = resolve_template(template, ck.template, ck.config.family, kind=ck.kind, strict=STRICT_TEMPLATE.value,
                              for_chat=for_chat)
  return ck, sampler, resolved
