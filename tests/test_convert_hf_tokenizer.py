"""The HF export's tokenizer files (gemma_jax/convert/hf_tokenizer.py): a plain transformers install, with
neither sentencepiece nor protobuf importable, loads the export and encodes, decodes and applies the chat
template exactly as our SentencePiece tokenizer and templates do. One subprocess per export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gemma_jax.convert.hf import write_hf
from gemma_jax.convert.hf_tokenizer import write_tokenizer_files
from gemma_jax.templates import get_template

pytest.importorskip("transformers")
pytest.importorskip("jinja2")

TEXTS = ["hello world", "the capital of france is paris.", "café naïve über straße", "東京 日本 中文",
         "emoji 🙂👍🏽 done", "multiple    spaces  and\ttabs", "trailing  ", " leading", "line one\nline two\n\n\n",
         "<start_of_turn>user\nhi<end_of_turn>\n", "x<start_of_turn>y", "1234567 digits", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the capital of france?"},
            {"role": "assistant", "content": "paris."}, {"role": "user", "content": "東京 and  café 🙂"}]

# Runs with sentencepiece and google.protobuf unimportable (None in sys.modules: `import` fails and
# importlib.util.find_spec says "not installed", which is what transformers checks).
_BLOCKER = "import sys\nfor _m in ('sentencepiece', 'google.protobuf'):\n  sys.modules[_m] = None\n"
_CHILD = r"""
import json, sys
for m in ("sentencepiece", "google.protobuf"):
  try:
    __import__(m)
    raise SystemExit(f"{m} is importable; the blocker did not run")
  except ImportError:
    pass
from transformers import AutoTokenizer
spec = json.load(open(sys.argv[1]))
tok = AutoTokenizer.from_pretrained(spec["dir"])
out = {"class": type(tok).__name__, "len": len(tok),
       "ids": [tok(t)["input_ids"] for t in spec["texts"]],
       "decoded": [tok.decode(ids, skip_special_tokens=False) for ids in spec["ids_no_bos"]],
       "chat": list(tok.apply_chat_template(spec["messages"], add_generation_prompt=True, tokenize=True,
                                            return_dict=False))}
print("RESULT " + json.dumps(out))
"""


def _check_in_plain_transformers(tmp_path, export_dir: str, tokenizer, template_name: str):
  ids = [tokenizer.encode(t) for t in TEXTS]
  spec = {"dir": export_dir, "texts": TEXTS, "ids_no_bos": ids, "messages": MESSAGES}
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  block = tmp_path / "block"
  block.mkdir()
  (block / "sitecustomize.py").write_text(_BLOCKER)
  (tmp_path / "child.py").write_text(_CHILD)
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
  env.update(PYTHONPATH=str(block), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
  r = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "spec.json")], env=env,
                     capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
  assert r.returncode == 0 and lines, r.stderr[-3000:]
  out = json.loads(lines[-1][len("RESULT "):])
  assert out["class"] == "GemmaTokenizer" and out["len"] == tokenizer.vocab_size
  for text, ours, theirs in zip(TEXTS, ids, out["ids"]):
    assert theirs == [tokenizer.special.bos] + ours, text
  assert out["decoded"] == [tokenizer.decode(i) for i in ids] == TEXTS
  assert out["chat"] == get_template(template_name).render_prompt(MESSAGES, tokenizer)


def test_export_loads_without_sentencepiece_tiny(tmp_path, tiny_tokenizer):
  from gemma_jax.convert.hf import read_hf
  imp = read_hf(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "gemma3"), progress=False)
  out = tmp_path / "export"
  write_hf(str(out), imp.config, imp.params, tokenizer=tiny_tokenizer,
           chat_template=get_template("gemma3").hf_jinja, progress=False)
  names = set(os.listdir(out))
  assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja"} <= names
  tc = json.load(open(out / "tokenizer_config.json"))
  assert tc["chat_template"] == get_template("gemma3").hf_jinja and tc["mask_token"] is None  # no <mask> piece: none added
  _check_in_plain_transformers(tmp_path, str(out), tiny_tokenizer, "gemma3")


@pytest.mark.slow
def test_export_loads_without_sentencepiece_real_270m(tmp_path):
  from gemma_jax.checkpoint import TOKENIZER_FILE
  from gemma_jax.real_model import real_model_path
  from gemma_jax.tokenizer import Tokenizer
  tok = Tokenizer(os.path.join(real_model_path(), TOKENIZER_FILE))
  out = tmp_path / "export"
  out.mkdir()
  write_tokenizer_files(str(out), tok, get_template("gemma3").hf_jinja, max_len=32768)
  _check_in_plain_transformers(tmp_path, str(out), tok, "gemma3")


def test_unsupported_sentencepiece_settings_are_one_line(tiny_tokenizer):
  from sentencepiece import sentencepiece_model_pb2 as pb
  from gemma_jax.convert.hf_tokenizer import build_hf_tokenizer
  from gemma_jax.errors import UserError
  from gemma_jax.tokenizer import Tokenizer
  m = pb.ModelProto()
  m.ParseFromString(tiny_tokenizer.model_proto)
  m.normalizer_spec.add_dummy_prefix = True
  with pytest.raises(UserError, match="add_dummy_prefix") as e:
    build_hf_tokenizer(Tokenizer(m.SerializeToString()))
  assert "\n" not in str(e.value)
