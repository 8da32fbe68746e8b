"""`python -m gemma_jax.data.inspect`: statistics, one line per malformed record, exit status, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gemma_jax.data.inspect import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_statistics(files, capsys):
  tok, ok, _ = files
  assert main([ok, "--kind=preference", "--template=gemma3", f"--tokenizer={tok}", "--max_length=128"]) == 0
  out = capsys.readouterr().out
  assert "records: 3  valid: 3  malformed (skipped): 0" in out
  assert "examples kept: 2  dropped: 1 (prompt does not fit), 0 (response does not fit)" in out
  assert "truncated: 0 prompts, 0 responses" in out
  assert "p50" in out and "p99" in out and "max" in out
  for name in ("prompt", "chosen", "rejected", "row"):
    assert f"\n  {name} " in out
  # The same file with the long prompt cut instead of dropped.
  main([ok, "--kind=preference", "--template=gemma3", f"--tokenizer={tok}", "--max_length=128",
        "--max_prompt_length=64"])
  out = capsys.readouterr().out
  assert "examples kept: 3" in out and "truncated: 1 prompts" in out


def test_sft_kind(files, capsys, tmp_path):
  tok, _, _ = files
  path = tmp_path / "sft.jsonl"
  path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"},
                                           {"role": "assistant", "content": "hello world"}]}) + "\n")
  assert main([str(path), "--kind=sft", "--template=gemma", f"--tokenizer={tok}"]) == 0
  assert "examples kept: 1" in capsys.readouterr().out


def run_cli(*args):
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, "-m", "gemma_jax.data.inspect", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT)


def test_malformed_records_fail_by_default(files):
  tok, _, bad = files
  r = run_cli(bad, "--kind=preference", "--template=gemma3", f"--tokenizer={tok}")
  assert r.returncode == 1
  assert r.stdout.splitlines() == [f"{bad}:2: 'chosen' and 'rejected' are identical",
                                   f"{bad}:3: broken JSON: Expecting ',' delimiter at column 30",
                                   f"{bad}:4: not valid UTF-8 (byte 0xe9 at column 16)"]
  assert r.stderr.strip() == (f"error: 3 malformed record(s) in {bad}; fix them, or skip them with "
                              "--skip_invalid")
  assert "Traceback" not in r.stderr


def test_skip_invalid_counts(files):
  tok, _, bad = files
  r = run_cli(bad, "--kind=preference", "--template=gemma3", f"--tokenizer={tok}", "--skip_invalid")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[:3] == [f"{bad}:2: 'chosen' and 'rejected' are identical",
                       f"{bad}:3: broken JSON: Expecting ',' delimiter at column 30",
                       f"{bad}:4: not valid UTF-8 (byte 0xe9 at column 16)"]
  assert "records: 5  valid: 2  malformed (skipped): 3" in r.stdout and "examples kept: 2" in r.stdout


def test_user_errors_are_one_line(files, tmp_path):
  tok, ok, _ = files
  for args, message in [((str(tmp_path / "missing.jsonl"), f"--tokenizer={tok}"), "no such file"),
                        ((ok, f"--tokenizer={tmp_path / 'nope.model'}"), "no such file"),
                        ((ok, f"--tokenizer={tok}", "--max_prompt_length=5000"), "max_prompt_length")]:
    r = run_cli(*args, "--kind=preference", "--template=gemma3")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_usable_examples_fails_like_training(files, tmp_path, capsys):
  """An empty file (or one whose every example is dropped) is refused by training: inspect says the same, rc 1."""
  from gemma_jax.data import LengthPolicy, prepare_dataset
  from gemma_jax.errors import DataError, run_main
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
      run_main(main, [str(path), "--kind=preference", "--template=gemma3", f"--tokenizer={tok}", "--max_length=128"])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and err == f"error: {training.value}\n"
    assert "examples kept: 0" in out  # the statistics come first
  assert str(training.value).endswith("long.jsonl: no usable examples (1 records, 0 malformed, 1 too long for "
                                      "max_length=128)")


def test_tokenizer_without_turn_tokens(files, tmp_path, capsys):
  import io
  import sentencepiece as spm
  from gemma_jax.errors import run_main
  _, ok, _ = files
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter([f"hello world {i} one two" for i in range(30)]),
                                 model_writer=out, vocab_size=40, model_type="bpe", pad_id=0, eos_id=1, bos_id=2,
                                 unk_id=3, minloglevel=2)
  tok = tmp_path / "plain.model"
  tok.write_bytes(out.getvalue())
  with pytest.raises(SystemExit):
    run_main(main, [ok, "--kind=preference", "--template=gemma", f"--tokenizer={tok}"])
  assert capsys.readouterr().err == (f"error: --tokenizer={tok} has no <start_of_turn>, <end_of_turn> tokens, "
                                     "which the 'gemma' template needs; use a Gemma tokenizer (or the completion "
                                     "template)\n")
