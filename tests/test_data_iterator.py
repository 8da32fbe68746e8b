"""The batch iterator: seeded order, epochs, exact resume from a saved state, host sharding, packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma_jax.data import DataIterator, LengthPolicy, prepare_dataset
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.templates import get_template

WORDS = "the capital of france is paris . a model answers questions about cities rivers and numbers".split()


def make_data(tmp_path, tok, kind, n=23, seed=0, name="d.jsonl"):
  rng = np.random.default_rng(seed)
  text = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
  with open(tmp_path / name, "w") as f:
    for i in range(n):
      if kind == "preference":
        rec = {"prompt": f"{i} " + text(rng.integers(1, 6)), "chosen": text(rng.integers(1, 10)),
               "rejected": text(rng.integers(1, 10)) + " !"}
      else:
        rec = {"messages": [{"role": "user", "content": f"{i} " + text(rng.integers(1, 6))},
                            {"role": "assistant", "content": text(rng.integers(1, 14))}]}
      f.write(json.dumps(rec) + "\n")
  data = prepare_dataset(tmp_path / name, kind=kind, template=get_template("gemma3"), tokenizer=tok,
                         policy=LengthPolicy(max_length=128))
  assert data.stats.kept == n
  return data


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def take(it, n):
  return [next(it) for _ in range(n)]


CASES = [("preference", {}), ("sft", {}), ("sft", {"packing": True})]


@pytest.mark.parametrize("kind,kw", CASES, ids=["preference", "sft", "sft-packed"])
def test_resume_is_exact(tmp_path, tiny_tokenizer, kind, kw):
  data = make_data(tmp_path, tiny_tokenizer, kind)
  opts = dict(batch_size=4, seed=3, **kw)
  # 23 examples / 4 per batch: k = 7 crosses an epoch boundary, so the restored order is a later epoch's.
  for k in (0, 2, 7):
    straight = take(DataIterator(data, **opts), k + 6)
    it = DataIterator(data, **opts)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert_batches_equal(take(DataIterator(data, state=state, **opts), 6), straight[k:])
    restored = DataIterator(data, **opts)
    restored.set_state(state)
    assert_batches_equal(take(restored, 6), straight[k:])


def test_state_refuses_other_data_or_seed(tmp_path, tiny_tokenizer):
  data = make_data(tmp_path, tiny_tokenizer, "preference")
  other = make_data(tmp_path, tiny_tokenizer, "preference", seed=1, name="other.jsonl")
  state = DataIterator(data, batch_size=2, seed=0).get_state()
  with pytest.raises(DataError, match="fingerprint"):
    DataIterator(other, batch_size=2, seed=0, state=state)
  with pytest.raises(DataError, match="seed"):
    DataIterator(data, batch_size=2, seed=1, state=state)
  with pytest.raises(DataError, match="version"):
    DataIterator(data, batch_size=2, state={"epoch": 0})


def test_epochs_visit_every_example_once(tmp_path, tiny_tokenizer):
  data = make_data(tmp_path, tiny_tokenizer, "sft", n=10)
  rows = {tuple(ex.ids.tolist()) for ex in data.examples}
  it = DataIterator(data, batch_size=3, seed=0, num_epochs=2, drop_remainder=False)
  batches = list(it)
  assert len(batches) == 8  # 4 per epoch, the last one of each filled with one example and empty rows
  seen = [tuple(b["tokens"][r][b["input_mask"][r]].tolist()) for b in batches for r in range(3)
          if b["input_mask"][r].any()]
  assert sorted(seen[:10]) == sorted(rows) and sorted(seen[10:]) == sorted(rows)
  assert seen[:10] != seen[10:]  # a new permutation each epoch
  assert not batches[3]["input_mask"][1:].any()  # the filler rows carry no tokens, no targets
  # Dropping the remainder: 3 batches per epoch, always full.
  it = DataIterator(data, batch_size=3, seed=0, num_epochs=2)
  assert it.steps_per_epoch == 3 and len(list(it)) == 6


def test_seed_and_shuffle(tmp_path, tiny_tokenizer):
  data = make_data(tmp_path, tiny_tokenizer, "sft", n=12)
  a = take(DataIterator(data, batch_size=4, seed=0), 3)
  assert_batches_equal(a, take(DataIterator(data, batch_size=4, seed=0), 3))
  b = take(DataIterator(data, batch_size=4, seed=1), 3)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
  plain = take(DataIterator(data, batch_size=4, shuffle=False), 1)[0]
  for r in range(4):
    np.testing.assert_array_equal(plain["tokens"][r][plain["input_mask"][r]], data.examples[r].ids)


@pytest.mark.parametrize("kind,kw", CASES, ids=["preference", "sft", "sft-packed"])
def test_host_shards_assemble_the_global_batch(tmp_path, tiny_tokenizer, kind, kw):
  data = make_data(tmp_path, tiny_tokenizer, kind)
  opts = dict(batch_size=4, seed=5, **kw)
  full = take(DataIterator(data, **opts), 5)
  hosts = [take(DataIterator(data, process_index=i, process_count=2, **opts), 5) for i in range(2)]
  for step in range(5):
    parts = [hosts[i][step] for i in range(2)]
    assert parts[0]["tokens"].shape == parts[1]["tokens"].shape  # all hosts agree on T
    for k in full[step]:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[step][k], err_msg=k)
  if kind == "preference":  # host 0 holds the chosen rows, host 1 the rejected ones
    assert hosts[0][0]["nll_mask"].any() and not hosts[1][0]["nll_mask"].any()
  with pytest.raises(ConfigError, match="hosts"):
    DataIterator(data, batch_size=3, process_index=0, process_count=4, **kw)


def test_preference_batches_pair_rows(tmp_path, tiny_tokenizer):
  data = make_data(tmp_path, tiny_tokenizer, "preference")
  b = next(DataIterator(data, batch_size=4, shuffle=False))
  assert b["tokens"].shape[0] == 8 and b["tokens"].shape[1] in (64, 128)
  for i, ex in enumerate(data.examples[:4]):
    np.testing.assert_array_equal(b["tokens"][i][b["input_mask"][i]], np.concatenate([ex.prompt, ex.chosen]))
    np.testing.assert_array_equal(b["tokens"][4 + i][b["input_mask"][4 + i]],
                                  np.concatenate([ex.prompt, ex.rejected]))
    np.testing.assert_array_equal(b["target_mask"][4 + i][len(ex.prompt):len(ex.prompt) + len(ex.rejected)],
                                  ex.rejected_target)
  assert not b["target_mask"][:, 0].any() and not b["nll_mask"][4:].any()
  np.testing.assert_array_equal(b["nll_mask"][:4, 1:], b["input_mask"][:4, 1:])


def test_packing_fills_rows_in_order(tmp_path, tiny_tokenizer):
  data = make_data(tmp_path, tiny_tokenizer, "sft", n=30)
  it = DataIterator(data, batch_size=2, shuffle=False, packing=True, num_epochs=1, drop_remainder=False)
  seen = []
  for b in it:
    assert b["tokens"].shape[1] <= 128
    for r in range(2):
      for seg in range(1, b["segment_ids"][r].max() + 1):
        m = b["segment_ids"][r] == seg
        np.testing.assert_array_equal(b["positions"][r][m], np.arange(m.sum()))
        assert not b["target_mask"][r][np.argmax(m)]
        seen.append(b["tokens"][r][m])
  assert len(seen) == 30
  for got, ex in zip(seen, data.examples):
    np.testing.assert_array_equal(got, ex.ids)
  with pytest.raises(ConfigError, match="packing"):
    DataIterator(make_data(tmp_path, tiny_tokenizer, "preference", name="p.jsonl"), batch_size=2, packing=True)


@pytest.mark.parametrize("kind,kw", CASES, ids=["preference", "sft", "sft-packed"])
def test_fewer_examples_than_a_batch_is_an_error_not_a_hang(tmp_path, tiny_tokenizer, kind, kw):
  data = make_data(tmp_path, tiny_tokenizer, kind, n=3)
  # Packed, 3 short examples fill one row: 4 rows can never be made. Unpacked, 3 < 4 examples.
  with pytest.raises(DataError, match="fewer than one batch of 4"):
    it = DataIterator(data, batch_size=4, **kw)
    next(it)
  it = DataIterator(data, batch_size=4, drop_remainder=False, **kw)  # a partial batch is allowed here
  assert next(it)["tokens"].shape[0] == (8 if kind == "preference" else 4)
