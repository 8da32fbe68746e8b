"""Chat templates as objects: one conversation rendered for sampling and for training.

    <bos><start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n ...

Four templates:
  "gemma"       Gemma 1 and Gemma 2 (HF `gemma-2-*-it`, `gemma-1.1-*-it`). A system message is an error.
  "gemma3"      Gemma 3 (HF `gemma-3-*-it`). A leading system message is folded into the first user turn as
                `{system}\n\n{user}` (the system text is not trimmed, exactly as HF's template does).
  "gemma4"      Gemma 4: the same turns written with tokenizer v4's markers, `<|turn>{role}\n{content}<turn|>\n`,
                and a system message is a turn of its own (`<|turn>system\n...`). The thinking mode and tool
                turns of the official format are not rendered.
  "completion"  plain text for pretrained (PT) checkpoints: BOS + prompt text, the reply continues it; no turn
                markers, no trimming; the end of a reply is marked by eos (`eos_target=True`).

Messages are `[{"role": "system" | "user" | "assistant" | "model", "content": str}]`. Role `assistant` is
written `model`; content is trimmed (`str.strip`, as Jinja's `trim`). After an optional system message, turns
alternate user, model, user, ... starting with user. Content may not contain the turn markers
`<start_of_turn>` / `<end_of_turn>` as text (they would become control tokens and corrupt the turn structure).
Other control-token names typed in content (`<bos>`, `<eos>`) stay text; HF re-tokenizes the rendered string and
turns them into control ids (a second BOS), the one place where we differ from HF on purpose.

Renderings: `render_prompt` (sampling: ends with the generation prompt), `render_training` (ids + target mask),
`render_response` (a reply's ids after a prompt), `render_next_turn` (multi-turn chat over a reused KV cache).
Token ids are produced segment by segment so that the sampling prompt is an exact token prefix of the
training rendering, and equal (tested against HF's Jinja templates) to tokenizing the whole rendered text:
the turn markers and newlines are their own tokens in Gemma's vocabulary, so no token spans a boundary.
Exactly one BOS, written by the template; rendered text is never tokenized with a second one.

The template saved with a checkpoint (`to_dict`) is always the inference template: training-only options
(`eos_target`, which messages are targets) are arguments of `render_training`, never part of the template.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

from gemma_jax.errors import UserError
from gemma_jax.tokenizer import TURN_MARKERS, Tokenizer

Message = Mapping[str, Any]

TEMPLATE_NAMES = ("gemma", "gemma3", "gemma4", "completion")
FAMILY_TEMPLATES = {"gemma1": "gemma", "gemma2": "gemma", "gemma3": "gemma3", "gemma4": "gemma4"}
TURN_FORMAT = {"gemma": "v3", "gemma3": "v3", "gemma4": "v4"}  # the tokenizer's turn markers each template writes

# The HF chat templates (tokenizer_config.json `chat_template`) these objects reproduce token for token; given
# to exporters that write HF tokenizer configs. tools/make_template_fixtures.py renders its own copy of them
# with transformers, and tests/test_templates.py checks the two copies are the same text.
HF_CHAT_TEMPLATES = {
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"),
    "gemma3": (
        "{{ bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- if messages[0]['content'] is string -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
        "    {%- else -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
        "    {%- endif -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n"
        "{%- else -%}\n"
        "    {%- set first_user_prefix = \"\" -%}\n"
        "    {%- set loop_messages = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n"
        "    {%- if (message['role'] == 'assistant') -%}\n"
        "        {%- set role = \"model\" -%}\n"
        "    {%- else -%}\n"
        "        {%- set role = message['role'] -%}\n"
        "    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {%- if message['content'] is string -%}\n"
        "        {{ message['content'] | trim }}\n"
        "    {%- elif message['content'] is iterable -%}\n"
        "        {%- for item in message['content'] -%}\n"
        "            {%- if item['type'] == 'image' -%}\n"
        "                {{ '<start_of_image>' }}\n"
        "            {%- elif item['type'] == 'text' -%}\n"
        "                {{ item['text'] | trim }}\n"
        "            {%- endif -%}\n"
        "        {%- endfor -%}\n"
        "    {%- else -%}\n"
        "        {{ raise_exception(\"Invalid content type\") }}\n"
        "    {%- endif -%}\n"
        "    {{ '<end_of_turn>\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{'<start_of_turn>model\n'}}\n"
        "{%- endif -%}\n"),
    # Ours: the turns of the official Gemma 4 format without its thinking and tool parts (the official Jinja
    # template was not available to test against; this one renders exactly what the "gemma4" object does).
    "gemma4": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('A system message may only come first') }}{% endif %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"),
    # Ours (no HF model ships it): the plain-text rendering of the completion template.
    "completion": "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}",
}


@dataclasses.dataclass(frozen=True)
class _Turn:
  role: str  # "user" or "model"
  content: str  # already trimmed (chat) and, for the first user turn of gemma3, prefixed with the system text


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A chat template; `name` is one of TEMPLATE_NAMES. Build with `get_template` or `template_for_family`."""

  name: str

  def __post_init__(self):
    if self.name not in TEMPLATE_NAMES:
      raise UserError(f"unknown chat template {self.name!r}; use one of {', '.join(TEMPLATE_NAMES)}")

  # -- serialization -------------------------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ChatTemplate:
    if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
      raise UserError(f"chat template: expected a dict with a 'name' field, got {d!r}")
    unknown = sorted(set(d) - {"name"})
    if unknown:
      raise UserError(f"chat template: unknown fields {', '.join(unknown)}")
    return cls(name=d["name"])

  @property
  def hf_jinja(self) -> str:
    """The HF Jinja chat template this object reproduces (for exporters)."""
    return HF_CHAT_TEMPLATES[self.name]

  @property
  def is_chat(self) -> bool:
    return self.name != "completion"

  # -- rendering -----------------------------------------------------------------------------------------

  def render_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """Ids for sampling: BOS, the turns, then the generation prompt `<start_of_turn>model\\n`.

    The last message must be a user turn. "completion": BOS + the text of a single user message.
    """
    turns = self._turns(messages)
    if not turns or turns[-1].role != "user":
      raise UserError("render_prompt: the conversation must end with a user message")
    if not self.is_chat:
      return [_bos(tokenizer)] + tokenizer.encode(turns[0].content)
    ids = [_bos(tokenizer)]
    for turn in turns:
      ids += self._turn_ids(turn, tokenizer)[0]
    return ids + self.generation_prompt(tokenizer)

  def render_training(self, messages: Sequence[Message], tokenizer: Tokenizer, *, eos_target: bool = False,
                      train_from: int = 0) -> tuple[list[int], list[bool]]:
    """Ids and a per-token target mask for training; the conversation ends with an assistant message.

    Targets: the content of each assistant message and its `<end_of_turn>`; not the BOS, the headers
    (`<start_of_turn>model\\n`), user turns, or the newline after `<end_of_turn>`. `train_from` (an index into
    `messages`) makes only assistant messages at or after it targets (a preference pair's response).
    `eos_target`: the last turn ends `<end_of_turn><eos>` (both targets; the trailing newline is dropped), so
    a model also learns to stop where only eos stops it. "completion": BOS + prompt text + reply text, the
    reply (and eos with `eos_target`) are the targets.
    """
    turns = self._turns(messages)
    if not turns or turns[-1].role != "model":
      raise UserError("render_training: the conversation must end with an assistant message")
    first_target_turn = self._turn_index(messages, train_from)
    ids, mask = [_bos(tokenizer)], [False]
    for i, turn in enumerate(turns):
      if self.is_chat:
        t_ids, t_mask = self._turn_ids(turn, tokenizer)
      else:
        t_ids = tokenizer.encode(turn.content)
        t_mask = [turn.role == "model"] * len(t_ids)
      if i < first_target_turn:
        t_mask = [False] * len(t_mask)
      ids += t_ids
      mask += t_mask
    if eos_target:
      if self.is_chat:  # drop the newline after the last <end_of_turn>
        n = len(_newline(tokenizer))
        ids, mask = ids[:-n], mask[:-n]
      ids.append(_eos(tokenizer))
      mask.append(True)
    return ids, mask

  def render_response(self, reply: Sequence[Message], tokenizer: Tokenizer, *,
                      eos_target: bool = False) -> tuple[list[int], list[bool]]:
    """Ids and target mask of a reply that follows a sampling prompt: for any prompt ending with a user turn,
    `render_prompt(prompt) + render_response(reply) == render_training(prompt + reply, train_from=len(prompt))`.

    `reply` starts with an assistant message (then user, assistant, ... ending with assistant); every
    assistant message in it is a target. Lets a preference pair render its shared prompt once.
    """
    if isinstance(reply, (str, bytes)) or not isinstance(reply, Sequence) or not reply:
      raise UserError("render_response: expects a non-empty list of messages starting with an assistant reply")
    turns = []
    for i, m in enumerate(reply):
      role, content = _check_message(m, i)
      want = "model" if i % 2 == 0 else "user"
      if role != want:
        raise UserError(f"reply message {i}: roles must alternate assistant/user starting with assistant, got "
                        f"{role!r}")
      turns.append(_Turn(role, content.strip() if self.is_chat else content))
    if turns[-1].role != "model":
      raise UserError("render_response: the reply must end with an assistant message")
    if not self.is_chat:
      if len(turns) > 1:
        raise UserError("the completion template takes one user message (the prompt) and at most one reply")
      ids = tokenizer.encode(turns[0].content)
      mask = [True] * len(ids)
    else:
      ids, mask = [], []
      for i, turn in enumerate(turns):
        t_ids, t_mask = self._turn_ids(turn, tokenizer)
        if i == 0:  # its header `<start_of_turn>model\n` ended the prompt
          n = len(self.generation_prompt(tokenizer))
          t_ids, t_mask = t_ids[n:], t_mask[n:]
        ids += t_ids
        mask += t_mask
    if eos_target:
      if self.is_chat:
        n = len(_newline(tokenizer))
        ids, mask = ids[:-n], mask[:-n]
      ids.append(_eos(tokenizer))
      mask.append(True)
    return ids, mask

  def render_next_turn(self, message: Message, tokenizer: Tokenizer) -> list[int]:
    """Ids to feed after a generated reply in multi-turn chat with a reused KV cache.

    The reply ended at `<end_of_turn>` (a stop token, not yet in the cache), so this is
    `<end_of_turn>\\n<start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n`:
    render_prompt(conversation) + reply ids + render_next_turn(next user message) equals
    render_prompt(conversation + [reply, next user message]).
    """
    if not self.is_chat:
      raise UserError("the completion template has no turns; multi-turn chat needs a chat template")
    if not isinstance(message, Mapping) or message.get("role") != "user":
      raise UserError("render_next_turn: expects a single user message {'role': 'user', 'content': ...}")
    (turn,) = self._turns([message])
    return ([_special(tokenizer, "end_of_turn")] + _newline(tokenizer) + self._turn_ids(turn, tokenizer)[0]
            + self.generation_prompt(tokenizer))

  def generation_prompt(self, tokenizer: Tokenizer) -> list[int]:
    """The ids that end every sampling prompt: `<start_of_turn>model\\n` ([] for "completion")."""
    if not self.is_chat:
      return []
    _check_turn_format(self.name, tokenizer)
    return [_special(tokenizer, "start_of_turn")] + _encode_constant(tokenizer, "model\n")

  def stop_token_ids(self, tokenizer: Tokenizer) -> list[int]:
    """The sampler stops on eos and on `<end_of_turn>` (when the vocabulary has it)."""
    ids = [_eos(tokenizer)]
    if tokenizer.special.end_of_turn is not None:
      ids.append(tokenizer.special.end_of_turn)
    return ids

  # -- internals -----------------------------------------------------------------------------------------

  def _turn_ids(self, turn: _Turn, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """`<start_of_turn>{role}\\n{content}<end_of_turn>\\n` and its target mask (model content + end_of_turn)."""
    _check_turn_format(self.name, tokenizer)
    sot, eot = _special(tokenizer, "start_of_turn"), _special(tokenizer, "end_of_turn")
    nl = _newline(tokenizer)
    if turn.role in ("user", "system"):  # one piece of text, exactly as the whole rendered string tokenizes
      body = tokenizer.encode(f"{turn.role}\n{turn.content}")
      ids = [sot] + body + [eot] + nl
      return ids, [False] * len(ids)
    header = _encode_constant(tokenizer, "model\n")
    content = tokenizer.encode(turn.content)  # separate, so the prompt's header is a token prefix
    ids = [sot] + header + content + [eot] + nl
    mask = [False] * (1 + len(header)) + [True] * (len(content) + 1) + [False] * len(nl)
    return ids, mask

  def _turn_index(self, messages: Sequence[Message], train_from: int) -> int:
    """Index of the turn that message `train_from` became (the system message is not a turn)."""
    if not 0 <= train_from <= len(messages):
      raise UserError(f"train_from={train_from} is outside the conversation of {len(messages)} messages")
    folded = self.name != "gemma4"  # gemma3 folds the system message into the first user turn
    has_system = bool(messages) and messages[0].get("role") == "system"
    return max(0, train_from - int(has_system and folded))

  def _turns(self, messages: Sequence[Message]) -> list[_Turn]:
    """Validates the conversation and applies the family's system and trimming rules."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
      raise UserError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    system = None
    turns = []
    for i, m in enumerate(messages):
      role, content = _check_message(m, i)
      if role == "system":
        if i != 0:
          raise UserError(f"message {i}: a system message may only come first")
        if self.name not in ("gemma3", "gemma4"):
          raise UserError(f"message 0: the {self.name!r} template has no system role (Gemma 1/2 and plain "
                          "completion reject it); merge it into the first user message or use 'gemma3'")
        if self.name == "gemma4":  # a turn of its own
          turns.append(_Turn("system", content.strip()))
          continue
        system = content
        continue
      dialogue = [t for t in turns if t.role != "system"]
      want = "user" if len(dialogue) % 2 == 0 else "model"
      if role != want:
        raise UserError(f"message {i}: roles must alternate user/assistant starting with user, got {role!r} "
                        f"where {'user' if want == 'user' else 'assistant'} was expected")
      if self.is_chat:
        content = content.strip()
      if system is not None and not turns:
        content = system + "\n\n" + content
      turns.append(_Turn(role, content))
    has_system = system is not None or any(t.role == "system" for t in turns)
    if self.is_chat and has_system and not any(t.role == "user" for t in turns):
      raise UserError("the conversation has a system message but no user message")
    if not self.is_chat and len(turns) > 2:
      raise UserError("the completion template takes one user message (the prompt) and at most one reply")
    return turns


def _check_message(m: Any, i: int) -> tuple[str, str]:
  if not isinstance(m, Mapping):
    raise UserError(f"message {i}: expected an object with 'role' and 'content', got {type(m).__name__}")
  role, content = m.get("role"), m.get("content")
  if role not in ("system", "user", "assistant", "model"):
    raise UserError(f"message {i}: role must be one of system, user, assistant, model; got {role!r}")
  if not isinstance(content, str):
    raise UserError(f"message {i}: content must be a string, got {type(content).__name__}")
  for marker in (m for pair in TURN_MARKERS.values() for m in pair):
    if marker in content:
      raise UserError(f"message {i}: content contains the control text {marker!r}; remove it")
  return ("model" if role == "assistant" else role), content


def _check_turn_format(template_name: str, tokenizer: Tokenizer) -> None:
  want = TURN_FORMAT.get(template_name)
  if want is not None and tokenizer.turn_format is not None and tokenizer.turn_format != want:
    other = "gemma4" if tokenizer.turn_format == "v4" else "gemma3"
    raise UserError(f"the {template_name!r} template writes {TURN_MARKERS[want][0]} turns but the tokenizer's "
                    f"markers are {tokenizer.turn_markers[0]} / {tokenizer.turn_markers[1]}; use the {other!r} "
                    "template")


def _special(tokenizer: Tokenizer, name: str) -> int:
  i = getattr(tokenizer.special, name)
  if i is None or i < 0:
    raise UserError(f"the tokenizer has no {name} token; the chat templates need a Gemma vocabulary")
  return i


def _bos(tokenizer: Tokenizer) -> int:
  return _special(tokenizer, "bos")


def _eos(tokenizer: Tokenizer) -> int:
  return _special(tokenizer, "eos")


def _newline(tokenizer: Tokenizer) -> list[int]:
  return _encode_constant(tokenizer, "\n")


@functools.lru_cache(maxsize=16)
def _encode_constant(tokenizer: Tokenizer, text: str) -> list[int]:
  return tokenizer.encode(text)


def render_prompts(template: ChatTemplate | None, prompts: Sequence[str], tokenizer: Tokenizer, *,
                   system: str | None = None) -> list[list[int]]:
  """One token row per prompt for sampling: BOS + text with `template` None (plain completion), else a user
  turn (after the system message, if any) and the model's turn opened."""
  if template is None:
    return [tokenizer.encode(p, add_bos=True) for p in prompts]
  first = [{"role": "system", "content": system}] if system else []
  return [template.render_prompt(first + [{"role": "user", "content": p}], tokenizer) for p in prompts]


def get_template(name: str) -> ChatTemplate:
  """The template called `name` ("gemma", "gemma3", "gemma4" or "completion")."""
  return ChatTemplate(name)


def template_for_family(family: str) -> ChatTemplate:
  """The chat template of an instruction-tuned checkpoint of `family` ("gemma1" ... "gemma4")."""
  if family not in FAMILY_TEMPLATES:
    raise UserError(f"unknown model family {family!r}; use one of {', '.join(FAMILY_TEMPLATES)}")
  return ChatTemplate(FAMILY_TEMPLATES[family])
