"""The sampling engine on tiny models: cached decode == full forward, batching, buckets, stops, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from gemma_jax.kernels import packed_matmul
from gemma_jax.model import Transformer, init_cache, init_params
from gemma_jax.sampling import Sampler, SamplingParams
from gemma_jax.sampling import program
from gemma_jax.sampling.buckets import bucket_length
from gemma_jax.sampling.streaming import IncrementalDecoder
from gemma_jax.sampling.weight_layout import WEIGHT_EQNS, WeightLayout, from_loop_layout, weight_name


def _model(family="gemma3", seed=0, flatten=0.1, **overrides):
  cfg = tiny_config(family, vocab_size=300, **overrides)
  params = init_params(cfg, jax.random.key(seed))
  # A random tied embedding makes each token predict itself with a huge margin; scaled down, the
  # next-token distribution is spread out, so sampling and stopping have something to do.
  params["embedder"]["input_embedding"] = params["embedder"]["input_embedding"] * flatten
  return cfg, params


# Every engine test below shares these shapes (batch 2, prompt chunks of 16, a 128-slot cache), so the
# whole file compiles the prefill and the decode loop once per strategy.
SAMPLE = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=11)


@pytest.fixture(scope="module")
def g3(tiny_tokenizer):
  cfg, params = _model("gemma3")
  return Sampler(cfg, params, tiny_tokenizer, prefill_chunk=16, min_cache=128)


@pytest.fixture(scope="module")
def full_logits(g3):
  """Reference: one forward pass without a cache (right-padded to 128: causal, so padding changes nothing)."""
  fwd = jax.jit(lambda p, x, m: Transformer(g3.config).apply({"params": p}, x, input_mask=m)[0])

  def run(ids):
    x = np.zeros((1, 128), np.int32)
    x[0, :len(ids)] = ids
    return np.asarray(fwd(g3.params, x, np.arange(128)[None] < len(ids))[0, :len(ids)])
  return run


def test_cached_decode_equals_full_forward_far_past_window():
  """Step-by-step decode with the ring-buffer cache vs one full forward, 40+ tokens past a window of 6.

  Gemma 2 (soft-caps, alternating local/global); Gemma 3 is checked through the jitted loop below.
  """
  cfg, params = _model("gemma2", seed=1, flatten=1.0)
  rng = np.random.default_rng(0)
  lengths = [9, 4]  # two rows, left-padded to 9, decoded in lockstep with their own positions
  steps = 45
  seqs = [rng.integers(4, 300, n + steps).tolist() for n in lengths]
  t = max(lengths)
  tokens = np.zeros((2, t), np.int32)
  mask = np.zeros((2, t), bool)
  pos = np.zeros((2, t), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, t - n:], mask[i, t - n:], pos[i, t - n:] = seqs[i][:n], True, np.arange(n)
  model = Transformer(cfg)
  cache = init_cache(cfg, 2, 64)
  step = jax.jit(lambda p, x, q, m, c: model.apply({"params": p}, x, positions=q, input_mask=m, cache=c))
  logits, cache = step(params, tokens, pos, mask, cache)
  got = [[np.asarray(logits[i, -1])] for i in range(2)]
  for k in range(steps - 1):
    x = np.array([[seqs[i][lengths[i] + k]] for i in range(2)], np.int32)
    q = np.array([[lengths[i] + k] for i in range(2)], np.int32)
    logits, cache = step(params, x, q, np.ones((2, 1), bool), cache)
    for i in range(2):
      got[i].append(np.asarray(logits[i, 0]))
  assert cache["layer_0"]["k"].shape[1] == cfg.sliding_window_size  # ring buffer, not the full length
  # reference: both rows in one batch, right-padded (causal attention: padding at the end changes nothing)
  full = np.zeros((2, t + steps), np.int32)
  for i, sq in enumerate(seqs):
    full[i, :len(sq)] = sq
  ref, _ = jax.jit(lambda p, x, m: model.apply({"params": p}, x, input_mask=m))(
      params, full, np.arange(t + steps)[None] < np.array(lengths)[:, None] + steps)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(np.stack(got[i]), np.asarray(ref[i, n - 1:n - 1 + steps]), atol=1e-4, rtol=0)


def test_greedy_loop_matches_full_forward_and_neighbours(g3, full_logits):
  """The jitted loop (chunked prefill past the window, lockstep rows) gives the teacher-forced argmax and
  its log-probs, and a row's output does not depend on the row beside it."""
  rng = np.random.default_rng(1)
  long = [2] + rng.integers(4, 300, 40).tolist()  # 3 chunks of 16, far past the window of 6
  short, other = [2, 270, 271], [2] + rng.integers(4, 300, 12).tolist()
  out = g3.generate([long, short], max_new_tokens=30, stop_ids=())
  for p, c in zip([long, short], out):
    assert c.stop_reason == "length" and len(c.tokens) == 30
    pred = full_logits(p + c.tokens)[len(p) - 1:-1]
    assert pred.argmax(-1).tolist() == c.tokens
    logp = jax.nn.log_softmax(pred, -1)
    np.testing.assert_allclose(c.logprobs, np.take_along_axis(logp, np.array(c.tokens)[:, None], 1)[:, 0],
                               atol=1e-4)
  assert len(set(out[0].tokens)) > 3
  again = g3.generate([other, long], max_new_tokens=30, stop_ids=())
  assert again[1].tokens == out[0].tokens


def test_compilations_are_bucketed(g3):
  """A new prompt length inside a bucket, a new max_new_tokens, new stop ids, a new temperature or top-p:
  no retrace. A prompt past the chunk adds the chunk-extend function once, not a new prefill."""
  import dataclasses
  g3.generate([[2, 5, 6, 7, 8], [2, 9]], max_new_tokens=3, stop_ids=())  # warm up
  g3.generate([[2, 5, 6, 7, 8], [2, 9]], max_new_tokens=3, sampling=SAMPLE)
  before = dict(program.TRACE_COUNTS)
  g3.generate([[2, 5, 6, 7, 8, 9, 10, 11], [2, 3]], max_new_tokens=7, stop_ids=(1,))
  g3.generate([[2, 5, 6], [2, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]], max_new_tokens=40, stop_ids=(1, 106))
  g3.generate([[2, 5, 6, 7], [2]], max_new_tokens=20,
              sampling=dataclasses.replace(SAMPLE, temperature=0.7, top_p=0.5, seed=3))
  # a new Sampler of the same model (the training loop makes one per evaluation) reuses the compiled code
  Sampler(g3.config, g3.params, g3.tokenizer, prefill_chunk=16, min_cache=128).generate(
      [[2, 5, 6, 7, 8], [2, 9]], max_new_tokens=9, stop_ids=())
  assert dict(program.TRACE_COUNTS) == before
  g3.generate([[2] + [5] * 40, [2, 3]], max_new_tokens=3, stop_ids=())  # 48 = 3 chunks of 16
  g3.generate([[2] + [5] * 20, [2, 3]], max_new_tokens=3, stop_ids=())  # 32 = 2 chunks of 16
  assert program.TRACE_COUNTS["prefill"] == before["prefill"]
  assert program.TRACE_COUNTS["extend"] - before.get("extend", 0) <= 1


def test_short_last_batch_is_padded_to_the_batch_size(g3):
  """10 prompts at batch size 8: the last 2 run as 8 rows, so prefill and decode are traced once, and every
  completion (and every streamed delta, at its global row) is what the unpadded batches give."""
  import collections
  s = Sampler(g3.config, g3.params, g3.tokenizer, prefill_chunk=16, min_cache=256)  # shapes no other test has
  prompts = [[2] + [5 + (7 * i + j) % 250 for j in range(1 + i % 5)] for i in range(10)]
  before = collections.Counter(program.TRACE_COUNTS)
  out = s.generate(prompts, max_new_tokens=6, stop_ids=(), batch_size=8)
  assert dict(collections.Counter(program.TRACE_COUNTS) - before) == {"prefill": 1, "decode": 1}
  unpadded = s.generate(prompts[:8], max_new_tokens=6, stop_ids=()) + s.generate(
      prompts[8:], max_new_tokens=6, stop_ids=())
  assert dict(collections.Counter(program.TRACE_COUNTS) - before) == {"prefill": 2, "decode": 2}  # batch 2
  assert len(out) == 10
  for got, want in zip(out, unpadded):
    assert (got.tokens, got.text, got.prompt_tokens, got.stop_reason) == (
        want.tokens, want.text, want.prompt_tokens, want.stop_reason)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  texts = collections.defaultdict(str)
  streamed = s.generate(prompts, max_new_tokens=6, stop_ids=(), batch_size=8,
                         on_text=lambda i, d: texts.__setitem__(i, texts[i] + d))
  assert [c.tokens for c in streamed] == [c.tokens for c in out]
  assert [texts[i] for i in range(10)] == [c.text for c in out] and set(texts) <= set(range(10))
  stop = out[9].tokens[2]  # a row that stops early (the fillers never hold the batch back)
  early = s.generate(prompts, max_new_tokens=6, stop_ids=(stop,), batch_size=8)
  assert early[9].stop_reason == "stop_id" and early[9].tokens == out[9].tokens[:out[9].tokens.index(stop)]


def test_seed_reproducible(g3):
  import dataclasses
  a = g3.generate([[2, 270, 271], [2, 280]], max_new_tokens=20, sampling=SAMPLE, stop_ids=())
  b = g3.generate([[2, 270, 271], [2, 280]], max_new_tokens=20, sampling=SAMPLE, stop_ids=())
  c = g3.generate([[2, 270, 271], [2, 280]], max_new_tokens=20, sampling=dataclasses.replace(SAMPLE, seed=12),
                  stop_ids=())
  assert [x.tokens for x in a] == [x.tokens for x in b]
  assert [x.tokens for x in a] != [x.tokens for x in c]
  assert len(set(a[0].tokens)) > 3  # it really samples


def test_per_row_stop_ids_and_early_exit(g3):
  prompts = [[2, 270, 271], [2, 280, 281, 282]]
  ref = g3.generate(prompts, max_new_tokens=20, stop_ids=())
  # stop row 0 at its 5th token (a token not generated earlier in row 0)
  k = next(i for i in range(3, 20) if ref[0].tokens[i] not in ref[0].tokens[:i])
  stop_tok = ref[0].tokens[k]
  out = g3.generate(prompts, max_new_tokens=20, stop_ids=(stop_tok,))
  assert out[0].tokens == ref[0].tokens[:k] and out[0].stop_reason == "stop_id" and out[0].stop_id == stop_tok
  assert out[0].text == g3.tokenizer.decode(ref[0].tokens[:k])
  cut1 = ref[1].tokens.index(stop_tok) if stop_tok in ref[1].tokens else 20
  assert out[1].tokens == ref[1].tokens[:cut1]
  # both rows stopping early ends the loop early
  both = sorted({ref[0].tokens[k], ref[1].tokens[3]})
  out = g3.generate(prompts, max_new_tokens=20, stop_ids=both)
  assert all(c.stop_reason == "stop_id" for c in out)
  assert g3.last_timing["decode_steps"] < 19


def test_stop_strings_cut_text(g3):
  prompts = [[2, 270, 271], [2, 280, 281, 282]]
  ref = g3.generate(prompts, max_new_tokens=24, stop_ids=())
  text = ref[0].text
  stop = text[6:9]
  j = text.find(stop)
  out = g3.generate(prompts, max_new_tokens=24, stop_ids=(), stop_strings=[stop])
  assert out[0].text == text[:j] and out[0].stop_reason == "stop_string"
  assert (out[0].stop_string, out[0].stop_id) == (stop, None)
  (other,) = g3.generate(prompts[:1], max_new_tokens=24, stop_ids=(), stop_strings=["\u2603never", stop])
  assert other.stop_string == stop  # the string that matched, not the first one listed
  assert ref[0].stop_string is None
  assert stop in g3.tokenizer.decode(out[0].tokens) and stop not in g3.tokenizer.decode(out[0].tokens[:-1])
  j1 = ref[1].text.find(stop)  # row 1 stops at the same string only where its text has it
  want1 = (ref[1].text, "length") if j1 < 0 else (ref[1].text[:j1], "stop_string")
  assert (out[1].text, out[1].stop_reason) == want1


def test_streaming_deltas_join_to_the_text(g3):
  sp = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=5)
  got = {0: [], 1: []}
  out = g3.generate([[2, 296], [2, 297, 298]], max_new_tokens=40, sampling=sp, stop_ids=(),
                    on_text=lambda i, d: got[i].append(d))
  for i in range(2):
    assert "".join(got[i]) == out[i].text
    assert len(got[i]) > 1


def test_incremental_decoder_never_splits_a_character(tiny_tokenizer):
  text = "東京 日本語 漢字 café über"
  ids = tiny_tokenizer.encode(text)
  pieces = [tiny_tokenizer.id_to_piece(i) for i in ids]
  assert sum(p.startswith("<0x") for p in pieces) >= 6  # byte fallback splits 語, 漢, 字
  dec = IncrementalDecoder(tiny_tokenizer)
  deltas = [dec.push([i]) for i in ids] + [dec.flush()]
  assert "".join(deltas) == text
  assert not any("\ufffd" in d for d in deltas)
  assert "漢" in deltas  # the three byte pieces come out together, as one character


def test_context_limit_is_a_user_error(g3):
  from gemma_jax.errors import UserError
  with pytest.raises(UserError, match="context"):
    g3.generate([[2, 5], [2]], max_new_tokens=10_000)


def test_sharded_sampling_equals_unsharded(g3, tiny_tokenizer):
  """Params, batch and cache on a mesh of 8 simulated devices: the same tokens and log-probs."""
  from gemma_jax.model import ShardingContext, make_mesh
  assert jax.device_count() == 8
  prompts = [[2, 270, 271], [2] + list(range(10, 40))]
  ctx = ShardingContext(make_mesh("data:2,fsdp:2,tensor:2"))
  sharded = Sampler(g3.config, g3.params, tiny_tokenizer, sharding=ctx, prefill_chunk=16, min_cache=128)
  a = g3.generate(prompts, max_new_tokens=12, sampling=SAMPLE, stop_ids=())
  run = sharded.stream(prompts, max_new_tokens=12, sampling=SAMPLE, stop_ids=(), interval=12)  # = generate
  for _ in run:
    pass
  b = run.completions
  assert [x.tokens for x in a] == [x.tokens for x in b]
  np.testing.assert_allclose([x.logprobs for x in a], [x.logprobs for x in b], atol=1e-4)
  assert sharded.layout == WeightLayout("loop_per_call")
  k = run.state.cache["layer_5"]["k"]  # the global layer: [B, S, K, H], batch over data, K over tensor
  assert k.sharding.spec[0] == "data" and k.sharding.spec[2] == "tensor"
  emb = sharded.params["embedder"]["input_embedding"]
  assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated


def test_penalties_in_the_loop(g3):
  """Huge repetition + presence penalties under greedy: no token of the prompt or of the output repeats."""
  prompts = [[2, 270, 271, 272], [2, 280, 281]]
  plain = g3.generate(prompts, max_new_tokens=20, stop_ids=())
  assert any(len(set(c.tokens)) < 20 for c in plain)  # without penalties this model repeats itself
  p = SamplingParams(temperature=0, repetition_penalty=1e6, presence_penalty=1e6)
  out = g3.generate(prompts, max_new_tokens=20, sampling=p, stop_ids=())
  for prompt, c in zip(prompts, out):
    assert len(set(c.tokens)) == 20 and not set(c.tokens) & set(prompt)


def test_the_cpu_default_layout_is_packed_where_the_kernel_is_built(g3):
  assert g3.layout == WeightLayout("packed" if packed_matmul.available() else "loop")
  assert g3.packed == packed_matmul.available()


@pytest.mark.skipif(not packed_matmul.available(), reason="no C++ compiler: packed kernel not built")
def test_packed_copy_holds_every_matmul_weight_in_panels(g3):
  """On CPU the Sampler runs a packed copy of the weights (tails of N % 32 columns included: vocab 300, D 48);
  unpacked, it is bitwise the params, and it really is rearranged (or the kernel would read the wrong numbers).
  The model it runs calls the kernel."""
  assert g3.packed
  stored, params = g3._run_params, g3.params
  names = []

  def check(path, p, s):
    name = weight_name(path)
    if name in WEIGHT_EQNS:
      names.append(name)
      assert s.shape == p.shape and not np.array_equal(np.asarray(s), np.asarray(p)), path
      np.testing.assert_array_equal(np.asarray(packed_matmul.unpack(WEIGHT_EQNS[name], s)), np.asarray(p))
    else:
      np.testing.assert_array_equal(np.asarray(s), np.asarray(p))
  jax.tree_util.tree_map_with_path(check, params, stored)
  assert set(names) == {"input_embedding", "q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear"}
  model = Transformer(g3.config, matmul=g3.layout.matmul)
  hlo = jax.jit(lambda p, t: model.apply({"params": p}, t)[0]).lower(stored, jnp.zeros((2, 3), jnp.int32)).as_text()
  assert hlo.count(f"@{packed_matmul._TARGET}(") == 1 + 5 * g3.config.num_layers  # the head, q/kv/out/mlp x2


def test_loop_layout_stores_attention_weights_transposed(g3, tiny_tokenizer):
  """`packed=False` on CPU: the loop layout (attention weights stored transposed, viewed back bitwise)."""
  loop = Sampler(g3.config, g3.params, tiny_tokenizer, prefill_chunk=16, min_cache=128, packed=False)
  assert not loop.packed and loop.layout == WeightLayout("loop")
  back = jax.jit(from_loop_layout)(loop._run_params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, g3.params)
  q = g3.params["layer_0"]["attn"]["q_einsum"]["w"]  # [N, D, H] -> stored [D, N, H]
  assert loop._run_params["layer_0"]["attn"]["q_einsum"]["w"].shape == (q.shape[1], q.shape[0], q.shape[2])


@pytest.mark.parametrize("kind", [
    pytest.param("packed", marks=pytest.mark.skipif(not packed_matmul.available(), reason="no packed kernel")),
    "loop", "loop_per_call"])
def test_every_layout_gives_the_plain_layouts_tokens_and_logprobs(g3, tiny_tokenizer, kind):
  """Each CPU weight layout against 'plain' (the params as they are, XLA's matmuls, as on other backends):
  the same greedy tokens, log-probs within 1e-5."""
  def sampler(kind):
    return Sampler(g3.config, g3.params, tiny_tokenizer, prefill_chunk=16, min_cache=128,
                   layout=WeightLayout(kind))
  plain, other = sampler("plain"), sampler(kind)
  assert plain._run_params is g3.params and (other._run_params is g3.params) == (kind == "loop_per_call")
  prompts = [[2, 40, 41, 42, 43], [2, 90, 91]]
  a = other.generate(prompts, max_new_tokens=24, stop_ids=())
  b = plain.generate(prompts, max_new_tokens=24, stop_ids=())
  for x, y in zip(a, b):
    assert x.tokens == y.tokens
    np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def test_prompt_buckets_waste_at_most_a_third():
  buckets = {bucket_length(n, 512) for n in range(1, 513)}
  assert sorted(buckets) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
  for n in range(17, 513):  # above the minimum bucket, padding stays under a third of the bucket
    b = bucket_length(n, 512)
    assert n <= b and (b - n) * 3 < b, (n, b)
  assert bucket_length(513, 512) == 1024 and bucket_length(20, 16) == 32


def test_gemma4_samples_in_every_layout_as_its_full_forward(tiny_tokenizer_v4):
  """Gemma 4 (global layers with their own cache shapes, K = V through `k_einsum`): greedy tokens in the
  packed and loop layouts equal the plain layout's, which equal the full forward's argmax; stops on <turn|>."""
  cfg, params = _model("gemma4")
  kinds = ["plain", "loop"] + (["packed"] if packed_matmul.available() else [])
  prompts = [[2, 40, 41, 42, 43], [2, 90, 91]]
  outs = {k: Sampler(cfg, params, tiny_tokenizer_v4, prefill_chunk=16, min_cache=128, layout=WeightLayout(k))
          .generate(prompts, max_new_tokens=12, stop_ids=()) for k in kinds}
  for k in kinds:
    for x, y in zip(outs[k], outs["plain"]):
      assert x.tokens == y.tokens, k
      # f32 through other GEMM orders (transposed or packed weights): log-probs of ~-4 agree to a few 1e-6
      np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=1e-5)
  fwd = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x)[0])
  for prompt, out in zip(prompts, outs["plain"]):
    logits = np.asarray(fwd(params, np.asarray([prompt + out.tokens], np.int32))[0])
    assert list(np.argmax(logits[len(prompt) - 1:-1], -1)) == out.tokens
  from gemma_jax.sampling.stopping import default_stop_ids
  assert default_stop_ids(tiny_tokenizer_v4) == (1, tiny_tokenizer_v4.piece_to_id("<turn|>"))


def test_gemma4_moe_samples_the_same_in_the_packed_layout(tiny_tokenizer_v4):
  """The experts are read directly (not through the matmul hook): the packed copy must leave them as they are."""
  cfg, params = _model("gemma4", num_experts=4, experts_per_token=2, expert_hidden_dim=16)
  kinds = ["plain"] + (["packed"] if packed_matmul.available() else ["loop"])
  prompts = [[2, 40, 41, 42, 43]]
  outs = [Sampler(cfg, params, tiny_tokenizer_v4, prefill_chunk=16, min_cache=128, layout=WeightLayout(k))
          .generate(prompts, max_new_tokens=8, stop_ids=())[0] for k in kinds]
  assert outs[0].tokens == outs[1].tokens
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
