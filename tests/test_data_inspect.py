"""`python -m gemma_jax.data.inspect`: training's defaults, the kind read from the records, statistics, --show,
one line per malformed record, one-line errors, exit status, no tracebacks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from gemma_jax.data import inspect
from gemma_jax.errors import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inspect_main(*args) -> int:
  """The command in this process: flags parsed as `app.run` would, then main (UserError propagates)."""
  return inspect.main(inspect.parse_flags(["inspect", *map(str, args)]))


@pytest.fixture()
def files(tmp_path, tiny_tokenizer):
  tok = str(tmp_path / "tokenizer.model")
  tiny_tokenizer.save(tok)
  good = [{"prompt": "hello", "chosen": "hello world", "rejected": "one two"},
          {"chosen": [{"role": "user", "content": "how are you today ?"}, {"role": "assistant", "content": "fine"}],
           "rejected": [{"role": "user", "content": "how are you today ?"}, {"role": "assistant", "content": "no"}]},
          {"prompt": " ".join(["paris"] * 200), "chosen": "a", "rejected": "b"}]
  bad = tmp_path / "bad.jsonl"
  with open(bad, "wb") as f:
    f.write((json.dumps(good[0]) + "\n").encode())
    f.write(b'{"prompt": "x", "chosen": "same", "rejected": "same"}\n')
    f.write(b'{"prompt": "x", "chosen": "y"\n')
    f.write(b'{"prompt": "caf\xe9", "chosen": "y", "rejected": "z"}\n')
    f.write((json.dumps(good[1]) + "\n").encode())
  ok = tmp_path / "ok.jsonl"
  ok.write_text("".join(json.dumps(r) + "\n" for r in good))
  return tok, str(ok), str(bad)


@pytest.fixture()
def sft_file(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                           {"role": "assistant", "content": "hello world"}]}) + "\n")
  return str(path)


def test_statistics(files, capsys):
  tok, ok, _ = files
  assert inspect_main(ok, "--template=gemma3", f"--tokenizer={tok}", "--max_length=128") == 0
  out = capsys.readouterr().out
  assert "records: 3  valid: 3  malformed (skipped): 0" in out
  assert "examples kept: 2  dropped: 1 (prompt does not fit), 0 (response does not fit)" in out
  assert "truncated: 0 prompts, 0 responses" in out
  assert "p50" in out and "p99" in out and "max" in out
  for name in ("prompt", "chosen", "rejected", "row"):
    assert f"\n  {name} " in out
  # The same file with the long prompt cut instead of dropped.
  inspect_main(ok, "--template=gemma3", f"--tokenizer={tok}", "--max_length=128", "--max_prompt_length=64")
  out = capsys.readouterr().out
  assert "examples kept: 3" in out and "truncated: 1 prompts" in out


def test_kind_is_inferred_from_the_records(files, sft_file, capsys):
  tok, ok, _ = files
  assert inspect_main(sft_file, "--template=gemma", f"--tokenizer={tok}") == 0
  out = capsys.readouterr().out
  assert "kind: sft (from the records)" in out and "examples kept: 1" in out and "\n  completion " in out
  assert inspect_main(ok, f"--tokenizer={tok}") == 0
  assert "kind: preference (from the records)" in capsys.readouterr().out
  # --kind forces it: SFT records read as pairs are all malformed.
  with pytest.raises(inspect.UserError, match="1 malformed record"):
    inspect_main(sft_file, "--kind=preference", f"--tokenizer={tok}")
  assert capsys.readouterr().out == f"{sft_file}:1: missing field 'chosen'\n"


def test_defaults_are_trainings(files, tmp_path, monkeypatch, capsys):
  """No flag: the real 270M's tokenizer (read from its GGUF, nothing converted), gemma3, max_length 256."""
  from gemma_jax import real_model
  _, ok, _ = files
  monkeypatch.setenv("GEMMA_JAX_CACHE", str(tmp_path / "empty_cache"))
  monkeypatch.setattr(real_model, "_convert", lambda *a: pytest.fail("inspect converted the real model"))
  assert inspect_main(ok, "--show=1") == 0
  out = capsys.readouterr().out
  assert "kind: preference (from the records)  template: gemma3  tokenizer: the real Gemma 3 270M's tokenizer" in out
  assert "max_length: 256  max_prompt_length: None" in out
  assert "examples kept: 3" in out  # 200 x "paris" fits in 256 of the real vocabulary
  assert "<start_of_turn>model\n[[hello world<end_of_turn>]]\n" in out
  assert not os.path.exists(tmp_path / "empty_cache" / real_model.NAME)


def test_defaults_match_the_default_recipe():
  """What `python -m train.train` reads without --config: the inspect defaults follow it."""
  from gemma_jax.training import objectives
  spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, "configs", "orpo_gemma3_270m_cpu.py"))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  c = recipe.get_config()
  assert c.init_from == "real:gemma3-270m" and not c.tokenizer  # the real model's tokenizer
  assert c.data.template == inspect.DEFAULT_TEMPLATE
  assert c.data.max_length == inspect.DEFAULT_MAX_LENGTH == inspect.FLAGS["max_length"].default
  assert objectives.get(c.objective).data_kind == inspect.DEFAULT_KIND


def test_ckpt_tokenizer_and_template(files, sft_file, tmp_path, tiny_tokenizer, capsys):
  import jax
  import numpy as np
  from gemma_jax import checkpoint
  from gemma_jax.model.params import init_params
  from gemma_jax.templates import get_template
  from helpers import tiny_config
  _, ok, _ = files
  config = tiny_config("gemma3", num_layers=1, vocab_size=tiny_tokenizer.vocab_size)
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  ckpt = tmp_path / "ckpt"
  checkpoint.save(ckpt, config=config, params=params, tokenizer=tiny_tokenizer,
                  template=get_template("gemma").to_dict(), kind="it")
  assert inspect_main(sft_file, f"--ckpt={ckpt}", "--show=1") == 0
  out = capsys.readouterr().out
  assert f"template: gemma  tokenizer: --ckpt={ckpt}'s tokenizer" in out  # not the default gemma3
  assert "[[hello world<end_of_turn>]]" in out
  assert inspect_main(sft_file, f"--ckpt={ckpt}", "--template=completion") == 0  # a flag still overrides it
  assert "template: completion" in capsys.readouterr().out


def test_show_marks_end_of_turn_as_a_target(files, sft_file, capsys):
  tok, ok, _ = files
  assert inspect_main(ok, f"--tokenizer={tok}", "--template=gemma3", "--max_length=128", "--show=5") == 0
  out = capsys.readouterr().out
  shown = out[out.index("\n2 example(s) as training sees them"):]  # only the kept ones
  assert (f"--- {ok}:1 chosen ---\n<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
          "[[hello world<end_of_turn>]]\n") in shown
  assert f"--- {ok}:1 rejected ---\n" in shown and "[[one two<end_of_turn>]]\n" in shown
  assert f"--- {ok}:2 chosen ---\n" in shown and "[[fine<end_of_turn>]]" in shown
  # SFT: every assistant reply of the conversation is a target, each ending with its <end_of_turn>.
  assert inspect_main(sft_file, f"--tokenizer={tok}", "--template=gemma", "--show=1") == 0
  assert "<start_of_turn>model\n[[hello world<end_of_turn>]]\n" in capsys.readouterr().out
  # The completion template trains eos instead.
  assert inspect_main(ok, f"--tokenizer={tok}", "--template=completion", "--max_length=128", "--show=1") == 0
  assert "[[hello world<eos>]]" in capsys.readouterr().out


def test_marked_text_runs(tiny_tokenizer):
  ids = tiny_tokenizer.encode("hello world one two", add_bos=True)
  target = [False] * 3 + [True] * (len(ids) - 3)
  text = inspect.marked_text(ids, target, tiny_tokenizer)
  assert text.startswith("<bos>") and text.count("[[") == 1 and text.endswith("]]")
  assert text.replace("[[", "").replace("]]", "") == "<bos>" + tiny_tokenizer.decode(ids[1:])


def run_cli(*args, env=None):
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
  return subprocess.run([sys.executable, "-m", "gemma_jax.data.inspect", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT)


@pytest.mark.slow
def test_malformed_records_fail_by_default(files):
  tok, _, bad = files
  r = run_cli(bad, "--template=gemma3", f"--tokenizer={tok}")
  assert r.returncode == 1
  assert r.stdout.splitlines() == [f"{bad}:2: 'chosen' and 'rejected' are identical",
                                   f"{bad}:3: broken JSON: Expecting ',' delimiter at column 30",
                                   f"{bad}:4: not valid UTF-8 (byte 0xe9 at column 16)"]
  assert r.stderr.strip() == (f"error: 3 malformed record(s) in {bad}; fix them, or skip them with "
                              "--skip_invalid")
  assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_bare_command_lists_every_bad_line(tmp_path):
  """No flag at all (the real tokenizer): more bad lines than training lists (100), every one named."""
  path = tmp_path / "many.jsonl"
  lines = [json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})]
  lines += [json.dumps({"prompt": "hi", "chosen": f"same {i}", "rejected": f"same {i}"}) for i in range(120)]
  lines += ['{"prompt": "hi"', json.dumps({"prompt": "hi", "chosen": "a"})]
  path.write_text("\n".join(lines) + "\n")
  r = run_cli(str(path))
  assert r.returncode == 1 and "Traceback" not in r.stderr
  expected = [f"{path}:{n}: 'chosen' and 'rejected' are identical" for n in range(2, 122)]
  expected += [f"{path}:122: broken JSON: Expecting ',' delimiter at column 16",
               f"{path}:123: missing field 'rejected'"]
  assert r.stdout.splitlines() == expected
  assert r.stderr == f"error: 122 malformed record(s) in {path}; fix them, or skip them with --skip_invalid\n"


@pytest.mark.slow
def test_skip_invalid_counts(files):
  tok, _, bad = files
  r = run_cli(bad, "--template=gemma3", f"--tokenizer={tok}", "--skip_invalid")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[:3] == [f"{bad}:2: 'chosen' and 'rejected' are identical",
                       f"{bad}:3: broken JSON: Expecting ',' delimiter at column 30",
                       f"{bad}:4: not valid UTF-8 (byte 0xe9 at column 16)"]
  assert "records: 5  valid: 2  malformed (skipped): 3" in r.stdout and "examples kept: 2" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--template=foo"], "error: flag --template=foo: value should be one of <gemma|gemma3|gemma4|completion>"),
    (["--show=-1"], "error: flag --show=-1: -1 is not a non-negative integer"),
    (["--max_length=x"], "error: flag --max_length=x: invalid literal for int() with base 10: 'x'"),
    (["--kind=pairs"], "error: flag --kind=pairs: value should be one of <auto|preference|sft>"),
    (["--bogus"], "error: Unknown command line flag 'bogus'"),
    (["OTHER"], "error: one data file at a time, got FILE OTHER: python -m gemma_jax.data.inspect FILE"),
])
def test_flag_errors_are_one_line(capsys, args, message):
  with pytest.raises(SystemExit) as e:
    inspect.parse_flags(["inspect", "FILE", *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1
  with pytest.raises(SystemExit) as e:
    inspect.parse_flags(["inspect"])
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: no data file: ")


@pytest.mark.slow
def test_user_errors_are_one_line(files, tmp_path):
  tok, ok, _ = files
  for args, message in [((str(tmp_path / "missing.jsonl"), f"--tokenizer={tok}"), "no such file"),
                        ((ok, f"--tokenizer={tmp_path / 'nope.model'}"), "no such file"),
                        ((ok, f"--tokenizer={tok}", "--max_prompt_length=5000"), "max_prompt_length"),
                        ((ok, f"--ckpt={tmp_path}"), str(tmp_path)),
                        ((ok, f"--tokenizer={tok}", "--template=gem"), "--template=gem"),
                        ((), "no data file")]:
    r = run_cli(*args)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_usable_examples_fails_like_training(files, tmp_path, capsys):
  """An empty file (or one whose every example is dropped) is refused by training: inspect says the same, rc 1."""
  from gemma_jax.data import LengthPolicy, prepare_dataset
  from gemma_jax.errors import DataError
  from gemma_jax.templates import get_template
  from gemma_jax.tokenizer import Tokenizer
  tok, _, _ = files
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"prompt": " ".join(["paris"] * 200), "chosen": "a", "rejected": "b"}) + "\n")
  for path in (empty, long):
    with pytest.raises(DataError) as training:
      prepare_dataset(path, kind="preference", template=get_template("gemma3"), tokenizer=Tokenizer(tok),
                      policy=LengthPolicy(128))
    with pytest.raises(SystemExit) as e:
      run_main(inspect_main, path, f"--tokenizer={tok}", "--max_length=128")
    out, err = capsys.readouterr()
    assert e.value.code == 1 and err == f"error: {training.value}\n"
    assert "examples kept: 0" in out  # the statistics come first
  assert str(training.value).endswith("long.jsonl: no usable examples (1 records, 0 malformed, 1 too long for "
                                      "max_length=128)")


def test_tokenizer_without_turn_tokens(files, tmp_path, capsys):
  import io
  import sentencepiece as spm
  _, ok, _ = files
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter([f"hello world {i} one two" for i in range(30)]),
                                 model_writer=out, vocab_size=40, model_type="bpe", pad_id=0, eos_id=1, bos_id=2,
                                 unk_id=3, minloglevel=2)
  tok = tmp_path / "plain.model"
  tok.write_bytes(out.getvalue())
  with pytest.raises(SystemExit):
    run_main(inspect_main, ok, "--template=gemma", f"--tokenizer={tok}")
  assert capsys.readouterr().err == (f"error: --tokenizer={tok} has no <start_of_turn>, <end_of_turn> tokens, "
                                     "which the 'gemma' template needs; use a Gemma tokenizer (or the completion "
                                     "template)\n")
