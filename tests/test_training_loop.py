"""The training loop end to end on a tiny model: metrics, TensorBoard events, evaluation with greedy samples,
the best and final checkpoints in our format (loadable and sampleable), non-finite steps, config errors."""

from __future__ import annotations

import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from training_helpers import make_workspace, read_metrics, run_config
from gemma_jax import checkpoint
from gemma_jax.errors import ConfigError
from gemma_jax.model.params import flatten
from gemma_jax.training import checkpointing, optim, state as state_lib, step as step_lib
from gemma_jax.training.loop import TrainingStopped, train


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_tokenizer):
  return make_workspace(tmp_path_factory.mktemp("ws"), tiny_tokenizer)


def read_events(workdir):
  """Scalars from the TensorBoard event files: {tag: {step: value}} (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in ev.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out


REAL_JIT_TRAIN_STEP = step_lib.jit_train_step


def inject_nonfinite(monkeypatch, steps: set[int]) -> None:
  """Makes the loss (so the gradients) of the 1-based training `steps` NaN: the loop's jitted train step
  multiplies the loss by a factor passed beside its aux (NaN on those steps, 1.0 otherwise)."""
  real = REAL_JIT_TRAIN_STEP

  def jit_train_step(*, loss_fn, mesh, aux_shardings=None, **kw):
    def poisoned(params, batch, aux):
      inner, factor = aux
      loss, metrics = loss_fn(params, batch, inner)
      return loss * factor, metrics

    jitted = real(loss_fn=poisoned, mesh=mesh, aux_shardings=(aux_shardings, NamedSharding(mesh, P())), **kw)

    def train_step(state, batch, aux):
      factor = np.float32(np.nan if int(jax.device_get(state.step)) + 1 in steps else 1.0)
      return jitted(state, batch, (aux, factor))
    return train_step

  monkeypatch.setattr(step_lib, "jit_train_step", jit_train_step)


def greedy_decode(model_config, params, prompt: list[int], stop_ids, max_new: int) -> list[int]:
  """Greedy tokens after `prompt` from full forward passes (no KV cache), cut before the first stop id."""
  from gemma_jax.model.transformer import Transformer
  model = Transformer(model_config)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t)[0][0, -1])
  seq, out = list(prompt), []
  for _ in range(max_new):
    logits = np.asarray(apply(params, jnp.asarray([seq], jnp.int32)))
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1e-4  # no near-tie: the cached decode must pick the same token
    nxt = int(np.argmax(logits))
    if nxt in stop_ids:
      break
    out.append(nxt)
    seq.append(nxt)
  return out


@pytest.mark.slow  # a whole run end to end: `bash scripts/test.sh --slow`
def test_train_end_to_end(ws, tmp_path):
  workdir = str(tmp_path / "run")
  result = train(run_config(ws), workdir)
  assert result.step == 6 and not result.stopped_by_signal

  rows = read_metrics(workdir)
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for r in train_rows:
    for k in ("loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm",
              "tokens_per_s", "epoch"):
      assert np.isfinite(r[k]), k
  # warmup ceil(0.2 * 6) = 2 steps, then cosine over 4
  np.testing.assert_allclose([r["learning_rate"] for r in train_rows], [0, 5e-3, 1e-2, 1e-2 * (0.5 + 0.5 * np.cos(np.pi / 4)),
                                                            5e-3, 1e-2 * (0.5 + 0.5 * np.cos(3 * np.pi / 4))],
                             rtol=1e-6, atol=1e-12)
  assert [r["step"] for r in eval_rows] == [3, 6]
  for r in eval_rows:
    assert 0.0 <= r["eval_rewards/accuracies"] <= 1.0 and np.isfinite(r["eval_rewards/margins"])
    assert r["eval_examples"] == 8 and r["eval_runtime"] > 0 and r["eval_stop_rate"] in (0.0, 1.0)
    (sample,) = r["eval_greedy_samples"]
    assert sample["prompt"].startswith("<start_of_turn>user\n") and isinstance(sample["completion"], str)
  assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns (lr 1e-2 on 48 pairs)

  events = read_events(workdir)
  assert sorted(events["loss"]) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(events["loss"][4], train_rows[3]["loss"], rtol=1e-6)
  assert sorted(events["eval_loss"]) == [3, 6]

  # The final model: our format, the training template, kind "it", the exact params of the last step.
  final = checkpoint.load(os.path.join(workdir, "final"))
  assert final.kind == "it" and final.template == {"name": "gemma3"}
  assert final.metadata["provenance"]["trained"]["chat_fine_tuned"] is True
  assert final.config.remat == "none" and final.tokenizer is not None
  tx, _ = optim.optimizer_from_config(run_config(ws).optim, 6)
  from gemma_jax.model.params import param_shapes
  from gemma_jax.model import ShardingContext, make_mesh, param_shardings
  mesh = make_mesh("fsdp:-1")
  shardings = state_lib.state_shardings(tx, param_shapes(final.config), param_shardings(final.config,
                                                                                         ShardingContext(mesh)), mesh)
  ck = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"), every=2)
  assert ck.all_steps() == [2, 4, 6]
  state, data_state, meta = ck.restore(6, state_lib.abstract_state(tx, param_shapes(final.config), shardings))
  ck.close()
  assert meta["step"] == 6 and data_state["batches"] == 6
  for a, b in zip(jax.tree.leaves(jax.device_get(final.params)), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)
  init = checkpoint.load(ws["init"])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(final.params)))

  # Sampleable as saved, with its own template.
  from gemma_jax.sampling import Sampler, default_stop_ids
  prompt = final.chat_template().render_prompt([{"role": "user", "content": "hello"}], final.tokenizer)
  (out,) = Sampler(final.config, final.params, final.tokenizer).generate([prompt], max_new_tokens=3)
  want = greedy_decode(final.config, final.params, prompt, default_stop_ids(final.tokenizer), 3)
  assert out.tokens == want
  assert out.stop_reason == ("length" if len(want) == 3 else "stop_id")

  best = checkpoint.load(os.path.join(workdir, "best"))
  best_step = min(eval_rows, key=lambda r: r["eval_loss"])["step"]
  assert best.metadata["provenance"]["trained"]["steps"] == best_step

  # Running again on a finished work directory resumes at the end and changes nothing.
  again = train(run_config(ws), workdir)
  assert again.step == 6
  final2 = checkpoint.load(os.path.join(workdir, "final"))
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(final2.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a whole run end to end: `bash scripts/test.sh --slow`
def test_nonfinite_steps_are_skipped_then_the_run_stops(ws, tmp_path, monkeypatch):
  workdir = str(tmp_path / "nan")
  inject_nonfinite(monkeypatch, {3, 4, 5})
  cfg = run_config(ws, num_steps=8, max_nonfinite=3, **{"data.eval": ""})
  with pytest.raises(TrainingStopped, match=r"stopped at step 5: 3 steps in a row had a non-finite"):
    train(cfg, workdir)
  rows = {r["step"]: r for r in read_metrics(workdir) if "loss" in r}
  assert [rows[s]["nonfinite"] for s in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 1]
  assert [rows[s]["nonfinite_run"] for s in (3, 4, 5)] == [1, 2, 3]
  assert not os.path.exists(os.path.join(workdir, "final"))
  # Steps 2 and 4 were saved; skipped steps 3 and 4 applied nothing, so both hold the same parameters.
  ck = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"), every=2)
  assert ck.all_steps() == [2, 4]
  ck.close()
  from gemma_jax.training.checkpointing import ocp
  p2 = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))["params"]
  p4 = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", "4", "state"))["params"]
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p4)):
    np.testing.assert_array_equal(a, b)

  # One non-finite step in a run that tolerates it: counted, skipped, the run finishes.
  workdir = str(tmp_path / "nan1")
  inject_nonfinite(monkeypatch, {2})
  cfg = run_config(ws, num_steps=4, max_nonfinite=2, **{"data.eval": ""})
  assert train(cfg, workdir).step == 4
  rows = {r["step"]: r for r in read_metrics(workdir) if "loss" in r}
  assert rows[2]["nonfinite"] == 1 and rows[2]["loss"] == "nan" and rows[3]["nonfinite"] == 0
  assert rows[3]["learning_rate"] == rows[2]["learning_rate"]  # the schedule counts applied updates only


def test_config_errors_are_one_line(ws, tmp_path):
  with pytest.raises(ConfigError, match="not a multiple of the mesh's data x fsdp size"):
    train(run_config(ws, batch_size=3), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="data.train is empty"):
    train(run_config(ws, **{"data.train": ""}), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="init_from is empty"):
    train(run_config(ws, init_from=""), str(tmp_path / "c"))
  with pytest.raises(ConfigError, match="objective="):
    train(run_config(ws, objective="kto"), str(tmp_path / "d"))
  with pytest.raises(ConfigError, match="multiple of grad_accum"):
    train(run_config(ws, grad_accum=3), str(tmp_path / "e"))


def write_sft(path, n, seed=0):
  import json
  from training_helpers import WORDS
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS, 3)), "completion": " ".join(rng.choice(WORDS, 4))})
              + "\n")
  return path


@pytest.mark.parametrize("objective", ["sft", "dpo", "simpo"])
def test_other_objectives_train(ws, tmp_path, objective):
  """Two steps of each objective through the loop; DPO's first loss is ln 2 (policy == frozen reference)."""
  over = {"objective": objective, "num_steps": 2, "checkpoint.every": 100, "data.eval": "",
          "optim.warmup": 0.0}
  if objective == "sft":
    over.update({"data.train": write_sft(str(tmp_path / "sft.jsonl"), 24), "batch_size": 8})
  result = train(run_config(ws, **over), str(tmp_path / "run"))
  rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2] and result.final_dir is not None
  assert all(np.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in rows)
  if objective == "dpo":
    assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # two passes, f32 rounding
    assert rows[1]["rewards/margins"] != 0.0  # the policy moved away from the reference
  elif objective == "sft":
    assert rows[0]["loss"] == pytest.approx(rows[0]["nll_loss"])
  else:
    assert "rewards/accuracies" in rows[0]


@pytest.mark.slow  # a whole run end to end: `bash scripts/test.sh --slow`
def test_merge_alpha_interpolates_the_final_model_toward_the_start(ws, tmp_path):
  """final/ = start + alpha * (trained - start); best/ and the run checkpoints keep the trained weights; the
  final model is evaluated on its own (a second eval row at the last step, marked) and its provenance says so;
  a finished run started again adds nothing."""
  workdir = str(tmp_path / "run")
  result = train(run_config(ws, num_steps=2, merge_alpha=0.25, **{"eval.every": 2}), workdir)
  init, final, best = (checkpoint.load(p) for p in (ws["init"], result.final_dir, os.path.join(workdir, "best")))
  trained = best.params  # the one evaluation is at the last step: best/ is the trained model
  for a, b, f in zip(*(jax.tree.leaves(t) for t in (init.params, trained, final.params))):
    np.testing.assert_allclose(f, a + 0.25 * (b - a), rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(f, b) for f, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(trained)))
  made = final.metadata["provenance"]["trained"]
  assert made["merge_alpha"] == 0.25 and "merge_alpha" not in best.metadata["provenance"]["trained"]
  evals = [r for r in read_metrics(workdir) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [2, 2] and evals[1]["eval_merge_alpha"] == 0.25
  assert "eval_merge_alpha" not in evals[0] and evals[0]["eval_loss"] != evals[1]["eval_loss"]
  assert made["eval_stop_rate"] == evals[1]["eval_stop_rate"]
  train(run_config(ws, num_steps=2, merge_alpha=0.25, **{"eval.every": 2}), workdir)
  assert len([r for r in read_metrics(workdir) if "eval_loss" in r]) == 2
  with pytest.raises(ConfigError, match="merge_alpha"):
    train(run_config(ws, merge_alpha=0.0), str(tmp_path / "zero"))


@pytest.mark.slow  # a whole run end to end: `bash scripts/test.sh --slow`
def test_frozen_parameters_stay_as_they_were_and_a_resume_must_freeze_the_same(ws, tmp_path):
  workdir = str(tmp_path / "run")
  over = {"num_steps": 2, "data.eval": "", "optim.freeze": "embedder"}
  result = train(run_config(ws, **over), workdir)
  init, final = checkpoint.load(ws["init"]), checkpoint.load(result.final_dir)
  np.testing.assert_array_equal(final.params["embedder"]["input_embedding"], init.params["embedder"]["input_embedding"])
  assert not np.array_equal(final.params["layer_0"]["mlp"]["linear"], init.params["layer_0"]["mlp"]["linear"])
  with pytest.raises(ConfigError, match=r"optim.freeze: 'embedder' saved, '' now"):
    train(run_config(ws, **{**over, "num_steps": 4, "optim.freeze": ""}), workdir)
  with pytest.raises(ConfigError, match=r"optim.freeze: 'embeder' matches no parameter"):
    train(run_config(ws, **{**over, "optim.freeze": "embeder"}), str(tmp_path / "typo"))


# ---------------------------------------------------------------------------------------------------------
# Nothing silently wrong: runs that cannot work are refused before any work, and say so in one line.


def test_a_tokenizer_larger_than_the_embedding_is_refused(ws, tmp_path, tiny_tokenizer):
  from helpers import tiny_config
  from gemma_jax.model import init_params
  small = tiny_config("gemma3", num_layers=2, vocab_size=200, embed_dim=32, hidden_dim=64, head_dim=8,
                      query_pre_attn_scalar=8)
  path = str(tmp_path / "small")
  checkpoint.save(path, config=small, params=jax.device_get(init_params(small, jax.random.key(0))),
                  tokenizer=tiny_tokenizer, kind="pt")
  with pytest.raises(ConfigError, match="has 300 pieces but the model's embedding has 200 rows"):
    train(run_config(ws, init_from=path), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # a refused run leaves no work directory


def test_fewer_pairs_than_a_batch_is_an_error_not_a_hang(ws, tmp_path):
  from training_helpers import write_pairs
  from gemma_jax.errors import DataError
  few = write_pairs(str(tmp_path / "few.jsonl"), 3)
  with pytest.raises(DataError, match="3 usable examples, fewer than one microbatch"):
    train(run_config(ws, num_steps=5, **{"data.train": few}), str(tmp_path / "run"))


def test_dropped_examples_are_counted_and_too_many_refused(ws, tmp_path, capsys):
  import json
  from gemma_jax.errors import DataError
  path = tmp_path / "long.jsonl"
  with open(path, "w") as f:
    for i in range(24):
      long = i % 2 == 0  # half the pairs do not fit 96 tokens
      f.write(json.dumps({"prompt": "hello " * (120 if long else 3), "chosen": "fine", "rejected": "no"}) + "\n")
  with pytest.raises(DataError, match=r"12 of 24 records would be dropped \(12 too long for max_length=96\)"):
    train(run_config(ws, **{"data.train": str(path)}), str(tmp_path / "a"))
  result = train(run_config(ws, num_steps=1, **{"data.train": str(path), "data.max_dropped_fraction": 0.6}),
                 str(tmp_path / "b"))
  assert result.step == 1
  assert "data: 12 training pairs from 24 records (12 too long for max_length=96); 8 held-out" in capsys.readouterr().out


def test_a_mostly_skipped_run_fails_and_writes_no_final_model(ws, tmp_path, monkeypatch):
  workdir = str(tmp_path / "skip")
  inject_nonfinite(monkeypatch, {1, 2, 3})
  cfg = run_config(ws, num_steps=4, max_nonfinite=10, **{"data.eval": ""})
  with pytest.raises(TrainingStopped, match=r"3 of 4 steps were skipped .* no final/ model was written"):
    train(cfg, workdir)
  assert not os.path.exists(os.path.join(workdir, "final"))
  (summary,) = [r for r in read_metrics(workdir) if "run/steps" in r]
  assert summary == {"step": 4, "run/steps": 4, "run/skipped_steps": 3}
  # Fewer than max_skipped_fraction: the model is written, and says how many steps it skipped.
  workdir = str(tmp_path / "ok")
  inject_nonfinite(monkeypatch, {2})
  result = train(run_config(ws, num_steps=4, **{"data.eval": ""}), workdir)
  assert result.skipped_steps == 1
  trained = checkpoint.read_metadata(os.path.join(workdir, "final"))["provenance"]["trained"]
  assert trained["skipped_steps"] == 1 and trained["steps"] == 4


@pytest.mark.slow  # a whole run end to end: `bash scripts/test.sh --slow`
def test_resuming_another_models_run_is_refused_and_keeps_it(ws, tmp_path, tiny_tokenizer):
  from helpers import tiny_config
  from gemma_jax.model import init_params
  workdir = str(tmp_path / "run")
  train(run_config(ws, num_steps=2, **{"data.eval": ""}), workdir)
  config_before = open(os.path.join(workdir, "config.json")).read()
  other = tiny_config("gemma3", num_layers=3, vocab_size=tiny_tokenizer.vocab_size, embed_dim=32, hidden_dim=64,
                      head_dim=8, query_pre_attn_scalar=8)
  path = str(tmp_path / "other")
  checkpoint.save(path, config=other, params=jax.device_get(init_params(other, jax.random.key(1))),
                  tokenizer=tiny_tokenizer, kind="pt")
  with pytest.raises(ConfigError, match=r"holds a run of another model.*num_layers: 2 saved, 3 now.* another "
                                        r"--workdir"):
    train(run_config(ws, num_steps=4, init_from=path, **{"data.eval": ""}), workdir)
  assert open(os.path.join(workdir, "config.json")).read() == config_before  # not overwritten
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


@pytest.mark.slow  # a whole run end to end: `bash scripts/test.sh --slow`
def test_a_finished_run_run_again_logs_nothing_twice(ws, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  cfg = run_config(ws, num_steps=3, **{"eval.every": 0})
  train(cfg, workdir)
  rows = read_metrics(workdir)
  shutil.rmtree(os.path.join(workdir, "final"))  # as if killed after the last evaluation, before final/
  os.makedirs(os.path.join(workdir, "final.tmp-0badc0de"))  # and a half-written save left behind
  again = train(cfg, workdir)
  assert read_metrics(workdir) == rows
  assert again.eval_metrics == {k: v for k, v in rows[-2].items() if k.startswith("eval_") and k != "eval_greedy_samples"}
  assert os.path.isdir(os.path.join(workdir, "final"))
  assert not os.path.exists(os.path.join(workdir, "final.tmp-0badc0de"))


def test_a_held_workdir_is_refused(ws, tmp_path):
  from gemma_jax.training.workdir import WorkdirLock
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = WorkdirLock(str(workdir))
  lock.acquire()
  try:
    with pytest.raises(ConfigError, match="is in use by another run"):
      train(run_config(ws, num_steps=1), str(workdir))
    assert os.listdir(workdir) == ["run.lock"]
  finally:
    lock.release()


@pytest.mark.slow  # a whole run end to end: `bash scripts/test.sh --slow`
def test_a_signal_while_reading_data_stops_after_the_last_step(ws, tmp_path, monkeypatch):
  """SIGTERM outside a step (here: while the next batch is read) stops at once; resuming finishes the run
  bitwise as an uninterrupted one."""
  import signal
  from gemma_jax.data import DataIterator
  cfg = run_config(ws, num_steps=4, **{"data.eval": "", "checkpoint.every": 100})
  ref = train(cfg, str(tmp_path / "ref"))
  calls = {"n": 0}
  real_next = DataIterator.__next__

  def next_with_signal(self):
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_next(self)

  monkeypatch.setattr(DataIterator, "__next__", next_with_signal)
  workdir = str(tmp_path / "run")
  stopped = train(cfg, workdir)
  assert stopped.stopped_by_signal and stopped.step == 2 and stopped.final_dir is None
  monkeypatch.setattr(DataIterator, "__next__", real_next)
  done = train(cfg, workdir)
  assert done.step == 4
  a = checkpoint.load(ref.final_dir).params
  b = checkpoint.load(done.final_dir).params
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _saved_keys(orbax_dir: str) -> list[tuple[str, ...]]:
  """The tree paths an orbax checkpoint directory stores (its _METADATA's tree_metadata keys)."""
  import ast
  with open(os.path.join(orbax_dir, "_METADATA")) as f:
    return [ast.literal_eval(k) for k in json.load(f)["tree_metadata"]]


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_what_a_run_writes_and_its_size(ws, tmp_path):
  """The default keeps one run checkpoint; final/ and best/ hold params only (no Adam moments): their tensors
  take about the params' bytes, a run checkpoint about 3x (params + two moments)."""
  from gemma_jax.training.run_config import default_config
  assert default_config().checkpoint.keep == 1
  workdir = str(tmp_path / "run")
  train(run_config(ws, **{"num_steps": 4, "checkpoint.keep": 1, "eval.every": 2}), workdir)
  names = set(os.listdir(workdir))
  assert {"checkpoints", "final", "best", "metrics.jsonl", "config.json"} <= names
  assert any(n.startswith("events.out.tfevents.") for n in names)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
  params = checkpoint.load(os.path.join(workdir, "final")).params
  param_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  # What each directory stores, read from orbax's tree metadata: final/ and best/ the parameters alone (one
  # orbax tree per top-level group), the run checkpoint the parameters and both Adam moments of each.
  names = set(flatten(params))
  for d in ("final", "best"):
    stored = {"/".join((g, *k)) for g in os.listdir(os.path.join(workdir, d, "params"))
              for k in _saved_keys(os.path.join(workdir, d, "params", g))}
    assert stored == names, d
  run = _saved_keys(os.path.join(workdir, "checkpoints", "4", "state"))
  for moment in ("mu", "nu"):
    assert {"/".join(k[k.index(moment) + 1:]) for k in run if moment in k} == names
  # ... so a run checkpoint takes about 3x the parameters' bytes and final/ about 1x (plus orbax's metadata)
  assert _dir_bytes(os.path.join(workdir, "checkpoints", "4")) >= 3 * param_bytes
  assert _dir_bytes(os.path.join(workdir, "final", "params")) >= param_bytes
