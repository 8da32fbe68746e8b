"""The absl scripts, run as users run them (subprocesses): sample.sample and the sample.chat REPL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from helpers import tiny_config

pytestmark = pytest.mark.slow  # end to end, as processes: `bash scripts/test.sh --slow`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, stdin=None, timeout=600, env=None):
  """env: replaces JAX_PLATFORMS=cpu (None values remove a variable)."""
  env = {"JAX_PLATFORMS": "cpu", **(env or {})}
  env = {k: v for k, v in {**os.environ, **env}.items() if k != "XLA_FLAGS" and v is not None}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, input=stdin, capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer):
  """A tiny instruction-tuned checkpoint (gemma3 template) and the same weights saved as PT."""
  from gemma_jax import checkpoint
  from gemma_jax.model import init_params
  cfg = tiny_config("gemma3", vocab_size=300)
  params = init_params(cfg, jax.random.key(4))
  params["embedder"]["input_embedding"] = params["embedder"]["input_embedding"] * 0.1
  root = tmp_path_factory.mktemp("ckpt")
  paths = {}
  for kind in ("it", "pt"):
    paths[kind] = str(root / kind)
    checkpoint.save(paths[kind], config=cfg, params=params, tokenizer=tiny_tokenizer,
                    template={"name": "gemma3"}, kind=kind)
  paths["config"], paths["params"] = cfg, params
  return paths


def test_sample_stdout_is_the_continuation(tiny_ckpt, tiny_tokenizer, tmp_path):
  from gemma_jax.sampling import Sampler, SamplingParams
  from gemma_jax.templates import get_template
  prompts = ["hello world", "the capital of france is", "東京"]
  f = tmp_path / "prompts.txt"
  f.write_text(prompts[0] + "\n\n" + prompts[1] + "\n" + prompts[2] + "\n", encoding="utf-8")
  r = _run("sample.sample", f"--ckpt={tiny_ckpt['it']}", f"--prompts_file={f}", "--max_new_tokens=7",
           "--output_format=jsonl", "--temperature=0", "--batch_size=2")
  assert r.returncode == 0, r.stderr
  rows = [json.loads(line) for line in r.stdout.splitlines()]
  assert [x["prompt"] for x in rows] == prompts
  # the same thing in process: the saved gemma3 template (auto, IT checkpoint), greedy
  s = Sampler(tiny_ckpt["config"], tiny_ckpt["params"], tiny_tokenizer)
  t = get_template("gemma3")
  ids = [t.render_prompt([{"role": "user", "content": p}], tiny_tokenizer) for p in prompts]
  want = s.generate(ids, max_new_tokens=7, stop_ids=t.stop_token_ids(tiny_tokenizer))
  assert [x["tokens"] for x in rows] == [w.tokens for w in want]
  assert [x["completion"] for x in rows] == [w.text for w in want]
  assert [(x["stop_reason"], x["stop_id"], x["stop_string"]) for x in rows] == \
      [(w.stop_reason, w.stop_id, w.stop_string) for w in want]
  assert "chat template 'gemma3'" in r.stderr

  # text format, PT checkpoint: auto = plain completion; the continuation alone on stdout
  r = _run("sample.sample", f"--ckpt={tiny_ckpt['pt']}", "--prompt=hello world", "--max_new_tokens=5",
           "--temperature=0.9", "--top_k=20", "--seed=3")
  assert r.returncode == 0, r.stderr
  want = s.generate(["hello world"], max_new_tokens=5,
                    sampling=SamplingParams(temperature=0.9, top_k=20, seed=3))
  assert r.stdout == want[0].text + "\n"
  assert "plain completion" in r.stderr


PT_LINE = "this is a pretrained (PT) checkpoint doing plain completion"


def test_sample_console_is_short_and_pt_says_so(tiny_ckpt, tmp_path):
  """stderr: what was loaded, the template, the PT line once; orbax's and jax's INFO records (the backend
  probe too: JAX_PLATFORMS unset) go to the log file, and to stderr with --verbosity=1."""
  cache = str(tmp_path / "cache")
  env = {"JAX_PLATFORMS": None, "GEMMA_JAX_CACHE": cache}
  r = _run("sample.sample", f"--ckpt={tiny_ckpt['pt']}", "--prompt=Why is the sky blue?", "--max_new_tokens=3",
           env=env)
  assert r.returncode == 0, r.stderr
  lines = r.stderr.splitlines()
  assert len(lines) < 15 and "orbax" not in r.stderr.lower(), r.stderr
  assert "Unable to initialize backend" not in r.stderr
  assert [x for x in lines if PT_LINE in x] == [f"warning: {x.removeprefix('warning: ')}" for x in lines
                                                if PT_LINE in x] and r.stderr.count(PT_LINE) == 1, r.stderr
  assert "--template=gemma3" in r.stderr and "instruction-tuned (IT)" in r.stderr
  log = os.path.join(cache, "logs", "sample.log")
  assert "sample.log" in _run("sample.sample", "--help").stdout
  text = open(log, encoding="utf-8").read()
  assert "Restoring checkpoint" in text and "gemma_jax " in text

  r = _run("sample.sample", f"--ckpt={tiny_ckpt['it']}", "--prompt=Why is the sky blue?", "--max_new_tokens=3",
           "--verbosity=1", env=env)
  assert r.returncode == 0, r.stderr
  assert "Restoring checkpoint" in r.stderr and PT_LINE not in r.stderr and "chat template 'gemma3'" in r.stderr
  assert "Restoring checkpoint" in open(log, encoding="utf-8").read()


@pytest.mark.parametrize("args,message", [
    (["--prompts_file=/nonexistent/p.txt"], "cannot read the prompts file"),
    (["--template=gemma", "--strict_template"], "differs from the checkpoint's saved template"),
    (["--top_p=0"], "top_p"),
    (["--stop_tokens=<no_such_piece>"], "not a single piece"),
])
def test_sample_user_errors_are_one_line(tiny_ckpt, args, message):
  r = _run("sample.sample", f"--ckpt={tiny_ckpt['it']}", *args)
  assert r.returncode == 1
  lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], r.stderr
  assert "Traceback" not in r.stderr and r.stdout == ""


def test_sample_not_a_checkpoint(tmp_path):
  r = _run("sample.sample", f"--ckpt={tmp_path}")
  assert r.returncode == 1 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr


def test_chat_repl(tiny_ckpt):
  r = _run("sample.chat", f"--ckpt={tiny_ckpt['pt']}", "--max_new_tokens=4",
           stdin="hello world\n\n/reset\nhow are you today ?\none two\n/quit\nnever read\n")
  assert r.returncode == 0, r.stderr
  replies = r.stdout.split("\n")
  assert len(replies) == 4 and replies[-1] == ""  # three replies, each ended by a newline
  assert "pretrained (PT)" in r.stderr and "instruction-tuned (IT)" in r.stderr
  r = _run("sample.chat", f"--ckpt={tiny_ckpt['it']}", "--template=gemma", "--max_new_tokens=3",
           stdin="hello\n")
  assert r.returncode == 0 and "differs" in r.stderr and "pretrained" not in r.stderr
  assert r.stdout.count("\n") == 1


# Runs several command lines of one script in one process (one jax import): flags are reset between cases.
_CASES = r"""
import contextlib, io, json, sys, traceback
from absl import flags
name, cases = sys.argv[1], json.loads(sys.argv[2])
module = __import__(name, fromlist=["main"])
results = []
for args, stdin in cases:
  flags.FLAGS.unparse_flags()
  err, out, rc = io.StringIO(), io.StringIO(), 0
  sys.stdin = io.StringIO(stdin)
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      flags.FLAGS([name, *args])
      module.main([name])
    except SystemExit as e:
      rc = e.code
    except BaseException:
      traceback.print_exc()
      rc = "traceback"
  results.append({"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def _run_cases(module, cases):
  """[(args, stdin)] -> [{"rc", "stderr", "stdout"}] of each case."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-c", _CASES, module, json.dumps(cases)], cwd=ROOT, capture_output=True,
                     text=True, timeout=600, env={**env, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.split("RESULTS ", 1)[1])


def _one_error_line(result):
  assert "Traceback" not in result["stderr"], result["stderr"]
  lines = [x for x in result["stderr"].splitlines() if x.startswith("error:")]
  assert result["rc"] == 1 and len(lines) == 1, result
  return lines[0]


def test_bad_flags_are_refused_at_start(tiny_ckpt):
  """NaN / infinite sampling values, template typos (before the checkpoint is even loaded: --ckpt does not
  exist), and a --system message that the template cannot take (sample: before sampling; chat: before the
  first turn, not at every turn)."""
  it, nowhere = f"--ckpt={tiny_ckpt['it']}", "--ckpt=/nonexistent/ckpt"
  sample_cases = [
      ([it, "--presence_penalty=nan"], "error: --presence_penalty=nan: must be a finite number (0 = off)"),
      ([it, "--temperature=inf"], "error: --temperature=inf: must be a finite number >= 0 (0 = greedy)"),
      ([it, "--top_p=nan"], "error: --top_p=nan: must be in (0, 1] (1 = off)"),
      ([it, "--repetition_penalty=-inf"], "error: --repetition_penalty=-inf: must be a finite number > 0 (1 = off)"),
      ([nowhere, "--template=gemm"],
       "error: --template=gemm: not a chat template; use auto or one of none, gemma, gemma3, gemma4, completion"),
      ([it, "--template=none", "--system=be brief"],
       "error: --system: plain completion has no system message; use a chat template that has one (gemma3)"),
      ([it, "--template=gemma", "--system=be brief"], "error: --system: the 'gemma' template has no system role"),
  ]
  chat_cases = [
      ([nowhere, "--template=gemm"], "error: --template=gemm: not a chat template; use auto or one of gemma, gemma3, gemma4"),
      ([nowhere, "--template=none"], "error: --template=none: chat needs a chat template with turns"),
      ([nowhere, "--min_p=nan"], "error: --min_p=nan: must be in [0, 1) (0 = off)"),
      ([it, "--template=gemma", "--system=be brief"], "error: --system: the 'gemma' template has no system role"),
  ]
  for module, cases in (("sample.sample", sample_cases), ("sample.chat", chat_cases)):
    results = _run_cases(module, [(args, "hello\nhow are you today ?\n") for args, _ in cases])
    for (args, message), result in zip(cases, results):
      assert _one_error_line(result).startswith(message), (args, result["stderr"])
      assert result["stdout"] == "", (args, result["stdout"])


@pytest.mark.slow
def test_default_sample_runs_the_real_model():
  """`python -m sample.sample` with no flags: greedy continuation of the default prompt by the real 270M."""
  r = _run("sample.sample", "--max_new_tokens=12")
  assert r.returncode == 0, r.stderr[-3000:]
  gens = json.load(open(os.path.join(ROOT, "tests", "fixtures", "real_270m", "generations.json"),
                        encoding="utf-8"))["generations"]
  assert gens[0]["prompt"] == "The capital of France is"
  want = gens[0]["text"]  # HF greedy, 24 tokens; ours stops after 12
  out = r.stdout[:-1]
  assert r.stdout.endswith("\n") and out and want.startswith(out), (out, want)
