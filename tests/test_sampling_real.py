"""The real Gemma 3 270M: greedy continuations equal HF transformers' (fixtures, including a prompt past the
512-token window) and the cached decode's log-probs equal a full forward's within 1e-4 (f32)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "real_270m")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
  from gemma_jax import checkpoint
  from gemma_jax.real_model import real_model_path
  from gemma_jax.sampling import Sampler
  ck = checkpoint.load(real_model_path(), dtype="float32")
  return ck, Sampler(ck.config, ck.params, ck.tokenizer)


@pytest.fixture(scope="module")
def generations():
  with open(os.path.join(FIXTURES, "generations.json"), encoding="utf-8") as f:
    return json.load(f)


def test_greedy_equals_hf_including_past_the_window(real, generations):
  ck, sampler = real
  gens = generations["generations"]
  n = generations["new_tokens"]
  assert max(g["num_prompt_tokens"] for g in gens) > ck.config.sliding_window_size
  # all prompts in one batch: left-padded, decoded in lockstep, the long one prefilled in two chunks
  out = sampler.generate([g["prompt_ids"] for g in gens], max_new_tokens=n, stop_ids=())
  for g, c in zip(gens, out):
    assert c.tokens == g["new_ids"], g["prompt"][:40]
    assert c.text == g["text"]
  # the prompts as text give the same ids (our tokenizer + BOS)
  assert [sampler.encode_prompts([g["prompt"]])[0] for g in gens] == [g["prompt_ids"] for g in gens]

  # cached decode == full forward (f32, 1e-4): the log-prob of every generated token, recomputed without a cache
  model = sampler.model  # the plain model, which reads ck.params (the sampler may run a packed copy)
  emb = ck.params["embedder"]["input_embedding"]
  from gemma_jax.model import logits_from_hidden
  fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, input_mask=m, return_hidden=True)[0])
  seqs = [g["prompt_ids"] + c.tokens for g, c in zip(gens, out)]
  t = max(map(len, seqs))
  x = np.zeros((len(seqs), t), np.int32)  # right-padded: causal, so the padding changes nothing before it
  for i, sq in enumerate(seqs):
    x[i, :len(sq)] = sq
  hidden = fwd(ck.params, x, np.arange(t)[None] < np.array([len(sq) for sq in seqs])[:, None])
  for i, (g, c) in enumerate(zip(gens, out)):
    p = g["num_prompt_tokens"]
    logp = jax.nn.log_softmax(logits_from_hidden(hidden[i, p - 1:p - 1 + n], emb, ck.config), -1)
    want = np.take_along_axis(np.asarray(logp), np.array(c.tokens)[:, None], 1)[:, 0]
    np.testing.assert_allclose(c.logprobs, want, atol=1e-4)
