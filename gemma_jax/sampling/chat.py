"""Multi-turn chat over one KV cache, the template saved with the checkpoint, and the PT/IT lesson.

Turn 1 prefills `template.render_prompt(messages)`; the reply is sampled until `<end_of_turn>`. Turn k > 1
prefills only what is new: the reply's last token if the cache does not hold it yet, then
`template.render_next_turn(message)` (which starts with the `<end_of_turn>` that closed the reply). Earlier
turns are never prefilled again (`Sampler.prefilled_tokens` counts it).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

from absl import logging

from gemma_jax.errors import UserError
from gemma_jax.sampling.engine import Completion, Sampler
from gemma_jax.sampling.stopping import StopRules
from gemma_jax.sampling.strategies import SamplingParams
from gemma_jax.templates import ChatTemplate, get_template, template_for_family

PT_CHAT_WARNING = (
    "this is a pretrained (PT) checkpoint: it was never trained on the chat template, so it does not answer "
    "a message, it continues the text (often writing more questions or the user's next turn). For a "
    "conversation use an instruction-tuned (IT) checkpoint, or fine-tune this one with the chat template "
    "(e.g. SFT/ORPO in gemma_jax.training). Plain completion stays available: python -m sample.sample "
    "--template=none.")


def pt_warning(kind: str | None) -> str | None:
  """The PT lesson when `kind` is "pt", else None."""
  return PT_CHAT_WARNING if kind == "pt" else None


def check_system(template: ChatTemplate | None, system: str, tokenizer, what: str = "system message") -> None:
  """UserError now, not at every turn, when `template` cannot take the system message (Gemma 1/2's template
  has no system role; None, plain completion, has no messages). `what` names it in the message."""
  if template is None or not template.is_chat:
    raise UserError(f"{what}: plain completion has no system message; use a chat template that has one "
                    "(gemma3)")
  try:
    template.render_prompt([{"role": "system", "content": system}, {"role": "user", "content": "."}], tokenizer)
  except UserError as e:
    raise UserError(f"{what}: {str(e).removeprefix('message 0: ')}") from None


def resolve_template(requested: str, saved: Mapping[str, Any] | None, family: str, *, kind: str | None = None,
                     strict: bool = False, for_chat: bool = False,
                     warn: Callable[[str], None] = logging.warning) -> ChatTemplate | None:
  """Which template to use; None = plain completion (BOS + text).

  requested: "auto" (the checkpoint's saved template; for plain sampling of a PT checkpoint, completion),
  "none" (plain completion) or a template name. A name that differs from the saved template warns, or with
  `strict` raises a UserError. With no saved template, "auto" takes the family's.
  """
  saved_t = ChatTemplate.from_dict(saved) if saved else None
  if requested == "none":
    if for_chat:
      raise UserError("--template=none is plain completion; chat needs a chat template (use auto or a name)")
    return None
  if requested == "auto":
    if not for_chat and kind == "pt":
      return None  # a PT model continues text: plain completion is what it is for
    if saved_t is None:
      warn(f"the checkpoint has no saved chat template; using the {family} family's")
      return template_for_family(family)
    return None if not saved_t.is_chat and not for_chat else saved_t
  t = get_template(requested)
  if saved_t is not None and saved_t.name != t.name:
    msg = (f"template {t.name!r} differs from the checkpoint's saved template {saved_t.name!r}; the model was "
           f"prepared with {saved_t.name!r}")
    if strict:
      raise UserError(msg + " (remove --strict_template to use it anyway, or pass --template=auto)")
    warn(msg)
  return t


class ChatSession:
  """A conversation with one model; `send(text)` returns the reply, the KV cache carries over turns.

  Args:
    sampler: the model.
    template: a chat template (`ChatTemplate`), e.g. the checkpoint's.
    system: an optional system message (templates that have no system role refuse it here, at once).
    kind: the checkpoint's kind; "pt" prints the PT lesson once.
  """

  def __init__(self, sampler: Sampler, template: ChatTemplate, *, system: str | None = None,
               sampling: SamplingParams = SamplingParams(), max_new_tokens: int = 256,
               stop_strings: tuple[str, ...] = (), kind: str | None = None,
               warn: Callable[[str], None] = logging.warning):
    if not template.is_chat:
      raise UserError(f"template {template.name!r} has no turns; chat needs a chat template")
    self.sampler, self.template, self.system = sampler, template, system
    self.sampling, self.max_new_tokens = sampling, max_new_tokens
    tok = sampler.tokenizer
    if system:
      check_system(template, system, tok)
    self.stop = StopRules(tuple(template.stop_token_ids(tok)), tuple(stop_strings))
    if pt_warning(kind):
      warn(pt_warning(kind))
    self.reset()

  def reset(self) -> None:
    """Forgets the conversation (the next turn starts a fresh cache)."""
    self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
    self._state = None
    self._pending: list[int] = []  # sampled ids the cache does not hold yet (the reply's unfed last token)
    self.last: Completion | None = None

  def stream(self, text: str) -> Iterator[str]:
    """Sends a user message; yields the reply as text deltas (complete characters only)."""
    message = {"role": "user", "content": text}
    tok = self.sampler.tokenizer
    if self._state is None:
      ids = self.template.render_prompt(self.messages + [message], tok)
    else:
      ids = self._pending + self.template.render_next_turn(message, tok)
    self.messages.append(message)
    run = self.sampler.continue_from(self._state, [ids], max_new_tokens=self.max_new_tokens,
                                     sampling=self.sampling, stop=self.stop, interval=1)
    self._state = None  # its cache was donated to `run`
    # one step per call: text appears as it is sampled, and a stop string feeds nothing extra
    for deltas in run:
      if deltas[0]:
        yield deltas[0]
    final, reply = run.state, run.completions[0]
    # The last sampled id was never fed: a stop id is dropped (render_next_turn starts with <end_of_turn>),
    # anything else (length, stop string) is fed with the next turn.
    last = int(final.last[0])
    self._pending = [] if reply.stop_reason == "stop_id" else [last]
    self._state = final
    self.last = reply
    self.messages.append({"role": "assistant", "content": reply.text})

  def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
    """Sends a user message and returns the whole reply (`on_text` gets the deltas as they come)."""
    out = []
    for d in self.stream(text):
      out.append(d)
      if on_text is not None:
        on_text(d)
    return "".join(out)
