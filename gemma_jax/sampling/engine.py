"""The sampling engine: prefill, then a jitted `lax.while_loop` decode over an explicit state pytree.

    prompts -> left-pad to a length bucket -> prefill (chunks on top of the KV cache) -> first token
            -> decode(state, steps): while step < max_new_tokens and not every row stopped:
                 forward(last token) -> penalties -> strategy -> record -> stop ids
            -> host: stop strings, cut at the stop, detokenize

Rows of different lengths decode in lockstep: each row has its own positions (a left-padded row gets the
positions it would have alone; padding is never written to the cache). Shapes that reach the compiler are
bucketed: the prompt length (16, 24, 32, 48, 64, ... up to `prefill_chunk`, then multiples of it) and the cache length
(powers of two); `max_new_tokens`, the number of steps per call, the stop ids and the strategy's numbers are
traced values, so none of them recompiles. Sliding-window layers keep a ring buffer of window size.

Letters: B batch, T prompt chunk, S cache length, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.errors import UserError
from gemma_jax.model import kv_cache
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import param_shardings
from gemma_jax.model.sharding import ShardingContext
from gemma_jax.model.transformer import Transformer, can_pack, few_rows_logits, pack_params, weight_name
from gemma_jax.sampling import stopping
from gemma_jax.sampling.streaming import IncrementalDecoder
from gemma_jax.sampling.strategies import (SamplingParams, Strategy, StrategyValues, apply_penalties,
                                           filter_and_sample)
from gemma_jax.tokenizer import Tokenizer

# Incremented while tracing (not while running): tests count compilations with it.
TRACE_COUNTS: collections.Counter = collections.Counter()


class DecodeState(NamedTuple):
  """Everything the decode loop carries. B rows, S cache slots (also the capacity of `tokens`)."""

  cache: kv_cache.Cache
  tokens: jax.Array  # [B, S] int32: sampled tokens, in order (column = step)
  last: jax.Array  # [B] int32: the latest sampled token, not yet fed to the model
  next_pos: jax.Array  # [B] int32: the position `last` takes when fed
  done: jax.Array  # [B] bool: the row has stopped (a stop id was sampled, or the host stopped it)
  num_tokens: jax.Array  # [B] int32: tokens sampled for the row, the stop id included
  step: jax.Array  # [] int32: columns of `tokens` filled
  max_new: jax.Array  # [] int32: stop after this many tokens
  key: jax.Array  # PRNG key
  logprobs: jax.Array  # [B, S] f32: log-prob of each sampled token under the model (before any strategy)
  seen: jax.Array  # [B, V] bool (prompt + output) when a penalty is on, else [B, 1]
  generated: jax.Array  # [B, V] bool (output only) when a penalty is on, else [B, 1]


@dataclasses.dataclass
class Completion:
  """One row's result. `text`/`tokens` are cut at the stop; `stop_reason`: 'stop_id', 'stop_string', 'length'."""

  text: str
  tokens: list[int]
  prompt_tokens: int
  stop_reason: str
  stop_id: int | None = None
  logprobs: list[float] | None = None  # model log-prob of each of `tokens`


def bucket_length(n: int, chunk: int, minimum: int = 16) -> int:
  """Prompt length bucket: the first of minimum * (1, 1.5, 2, 3, 4, 6, 8, ...) >= n, up to `chunk`, then a
  multiple of `chunk`. The half steps cap the padding at a third of the bucket (not half, as powers of two
  would): prefill is compute-bound, so padding costs time to first token in proportion."""
  if n <= chunk:
    b = minimum
    while b < n:
      b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 16 -> 24 -> 32 -> 48 -> 64 ...
    return min(b, chunk)
  return -(-n // chunk) * chunk


def cache_bucket(n: int, minimum: int = 128) -> int:
  """Cache length bucket: the power of two >= max(n, minimum)."""
  b = minimum
  while b < n:
    b *= 2
  return b


def grow_cache(cache: kv_cache.Cache, config: TransformerConfig, max_len: int) -> kv_cache.Cache:
  """The same cache with room for positions < max_len (appends empty slots; slots of old tokens keep p % S).

  Valid because every written position p is below the old length S of global layers (slot p stays p) and a
  sliding layer only grows while it is shorter than its window (so it has never wrapped).
  """
  out = {}
  for name, layer in cache.items():
    i = int(name.split("_")[1])
    s_new, s_old = kv_cache.layer_cache_length(config, i, max_len), layer["pos"].shape[1]
    if s_new == s_old:
      out[name] = layer
      continue
    pad = s_new - s_old
    kv_pad = ((0, 0), (0, pad), (0, 0), (0, 0))
    out[name] = {"k": jnp.pad(layer["k"], kv_pad), "v": jnp.pad(layer["v"], kv_pad),
                 "pos": jnp.pad(layer["pos"], ((0, 0), (0, pad)), constant_values=-1)}
  return out


# XLA CPU copies these attention weights into its GEMM layout wherever they are used: inside the decode loop
# on every step (its loop-invariant code motion leaves a lone transpose in the body; for the real 270M, 54
# copies and ~20 ms of a ~50 ms step at batch 1), and once per prefill call. So on CPU the weights are kept
# transposed (`to_loop_layout`) and viewed back inside the programs (`from_loop_layout`), a transpose that
# layout assignment turns into a free bitcast in the GEMM's preferred layout.
_CPU_LOOP_LAYOUTS = {"q_einsum": (1, 0, 2), "kv_einsum": (0, 1, 3, 2), "qkv_einsum": (0, 1, 3, 2),
                     "attn_vec_einsum": (1, 0, 2)}


def _layout_perm(path) -> tuple[int, ...] | None:
  if jax.default_backend() != "cpu":
    return None
  return _CPU_LOOP_LAYOUTS.get(weight_name(path)) if getattr(path[-1], "key", None) == "w" else None


def to_loop_layout(params: Any) -> Any:
  """The params with the attention weights physically transposed (CPU; other backends: unchanged)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _layout_perm(path) is None else jnp.transpose(x, _layout_perm(path)), params)


def from_loop_layout(params: Any) -> Any:
  """Inverse of `to_loop_layout`: the params as the model reads them."""
  def back(path, x):
    order = _layout_perm(path)
    return x if order is None else jnp.transpose(x, tuple(sorted(range(len(order)), key=order.__getitem__)))
  return jax.tree_util.tree_map_with_path(back, params)


def _token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log_softmax(logits)[b, tokens[b]] -> [B], without writing the [B, V] log-softmax (two reductions)."""
  return jnp.take_along_axis(logits, tokens[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, -1)


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
  return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


class _Program:
  """The jitted functions for one (config, sharding); shared by every Sampler of that model (see `_program`),
  so a new Sampler (e.g. one per evaluation in a training run) does not compile again."""

  def __init__(self, config: TransformerConfig, sharding: ShardingContext | None, packed: bool):
    self.config, self.sharding = config, sharding
    # `packed` (unsharded f32 on CPU, see `Sampler`): the Sampler stores every matmul weight in panels for the
    # packed kernel (`store`) and the model reads them so. Else, unsharded on CPU, it stores a copy of the
    # attention weights in the loop layout (~11% of the 270M's bytes); sharded on CPU, the decode loop
    # transposes them once per call (their shardings stay those of the model's layout). Other backends use the
    # params as they are.
    self.packed = packed
    self.stored_layout = sharding is None and jax.default_backend() == "cpu" and not packed
    self.model = Transformer(config, sharding, packed=self.packed)
    if self.packed:
      self.store = jax.jit(pack_params)
    elif self.stored_layout:
      self.store = jax.jit(to_loop_layout)
    else:
      self.store = lambda p: p
    self.extend = jax.jit(self._extend_impl, donate_argnames=("cache",))
    self.prefill = jax.jit(self._prefill_impl, static_argnames=("strategy", "out_len"), donate_argnames=("cache",))
    self.decode = jax.jit(self._decode_impl, static_argnames=("strategy",), donate_argnames=("state",))

  def _constrain_cache(self, cache):
    if self.sharding is None:
      return cache
    axes = kv_cache.cache_axes(cache)
    return jax.tree.map(lambda a, x: jax.lax.with_sharding_constraint(x, self.sharding.sharding(a, x.shape)),
                        axes, cache, is_leaf=lambda a: isinstance(a, tuple))

  # -- jitted pieces -------------------------------------------------------------------------------------
  def _model_params(self, params):
    return from_loop_layout(params) if self.stored_layout else params

  def _forward(self, params, tokens, positions, mask, cache):
    hidden, cache = self.model.apply({"params": params}, tokens, positions=positions, input_mask=mask,
                                     cache=cache, return_hidden=True)
    return hidden, self._constrain_cache(cache)

  def _extend_impl(self, params, tokens, positions, mask, cache):
    """Feeds a prompt chunk [B, T] into the cache (no logits)."""
    TRACE_COUNTS["extend"] += 1
    params = self._model_params(params)
    return self._forward(params, tokens, positions, mask, cache)[1]

  def _prefill_impl(self, params, tokens, positions, mask, cache, key, values, stop_ids, max_new, *,
                    strategy: Strategy, out_len: int):
    """The last prompt chunk [B, T] (left-padded: each row's last token at T - 1) -> the first token + state."""
    TRACE_COUNTS["prefill"] += 1
    params = self._model_params(params)
    hidden, cache = self._forward(params, tokens, positions, mask, cache)
    logits = few_rows_logits(hidden[:, -1], params["embedder"]["input_embedding"], self.config, self.packed)
    b, v = logits.shape
    if strategy.needs_seen:
      seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], jnp.where(mask, tokens, v)].set(True, mode="drop")
      generated = jnp.zeros((b, v), bool)
    else:
      seen = generated = jnp.zeros((b, 1), bool)
    key, sub = jax.random.split(key)
    first = filter_and_sample(apply_penalties(logits, strategy, values, seen, generated), sub, strategy, values)
    if strategy.needs_seen:
      seen = seen.at[jnp.arange(b), first].set(True)
      generated = generated.at[jnp.arange(b), first].set(True)
    lp = _token_logprob(logits, first)
    state = DecodeState(
        cache=cache, tokens=jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(first), last=first,
        next_pos=positions[:, -1] + 1, done=_is_stop(first, stop_ids), num_tokens=jnp.ones((b,), jnp.int32),
        step=jnp.ones((), jnp.int32), max_new=max_new, key=key, seen=seen, generated=generated,
        logprobs=jnp.zeros((b, out_len), jnp.float32).at[:, 0].set(lp))
    return state

  def _decode_impl(self, params, state: DecodeState, num_steps, values, stop_ids, *, strategy: Strategy):
    """Runs up to `num_steps` decode steps (fewer when max_new is reached or every row has stopped)."""
    TRACE_COUNTS["decode"] += 1
    end = jnp.minimum(state.step + num_steps, state.max_new)
    b = state.last.shape[0]
    # the weights the loop carries: as stored, else put in the loop layout here (behind a barrier, so XLA
    # keeps the transposes outside the loop); `view` is what the model reads of them
    stored = self.stored_layout or self.packed
    carried = params if stored else jax.lax.optimization_barrier(to_loop_layout(params))
    view = (lambda p: p) if self.packed else from_loop_layout

    def cond(carry):
      st = carry[0]
      return (st.step < end) & ~jnp.all(st.done)

    def body(carry):
      st, params = carry[0], view(carry[1])
      hidden, cache = self._forward(params, st.last[:, None], st.next_pos[:, None], ~st.done[:, None], st.cache)
      logits = few_rows_logits(hidden[:, 0], params["embedder"]["input_embedding"], self.config, self.packed)
      key, sub = jax.random.split(st.key)
      tok = filter_and_sample(apply_penalties(logits, strategy, values, st.seen, st.generated), sub, strategy,
                              values)
      tok = jnp.where(st.done, 0, tok)
      seen, generated = st.seen, st.generated
      if strategy.needs_seen:
        rows = jnp.arange(b)
        idx = jnp.where(st.done, seen.shape[1], tok)
        seen = seen.at[rows, idx].set(True, mode="drop")
        generated = generated.at[rows, idx].set(True, mode="drop")
      live = ~st.done
      lp = _token_logprob(logits, tok)[:, None]
      return DecodeState(
          cache=cache, tokens=jax.lax.dynamic_update_slice(st.tokens, tok[:, None], (0, st.step)),
          last=jnp.where(live, tok, st.last), next_pos=st.next_pos + live, done=st.done | _is_stop(tok, stop_ids),
          num_tokens=st.num_tokens + live, step=st.step + 1, max_new=st.max_new, key=key, seen=seen,
          generated=generated, logprobs=jax.lax.dynamic_update_slice(st.logprobs, lp, (0, st.step))), carry[1]

    return jax.lax.while_loop(cond, body, (state, carried))[0]


@functools.lru_cache(maxsize=8)
def _program(config: TransformerConfig, sharding: ShardingContext | None, packed: bool) -> _Program:
  return _Program(config, sharding, packed)


class Sampler:
  """Samples from a Gemma model. Holds the params (placed on the mesh when `sharding` is given).

  Args:
    config, params, tokenizer: the model.
    sharding: a `ShardingContext`; params, batch and cache are then sharded by the rules table.
    prefill_chunk: longest prompt chunk fed at once (longer prompts are prefilled chunk by chunk).
    min_cache: smallest cache bucket.
    packed: run the matmuls through the packed CPU kernel (`gemma_jax.kernels.packed_matmul`) on a copy of
      the weights stored in its panels: at batch 8, decoding the 270M is 1.5-1.75x faster. None (default): when
      it can (unsharded, f32, CPU, a C++ compiler here). The copy costs the params' bytes once more.
  """

  def __init__(self, config: TransformerConfig, params: Any, tokenizer: Tokenizer, *,
               sharding: ShardingContext | None = None, prefill_chunk: int = 512, min_cache: int = 128,
               packed: bool | None = None):
    self.config = config
    self.tokenizer = tokenizer
    self.sharding = sharding
    self.prefill_chunk = prefill_chunk
    self.min_cache = min_cache
    can = sharding is None and jax.default_backend() == "cpu" and can_pack(config)
    if packed and not can:
      raise UserError("Sampler(packed=True) needs an unsharded f32 model on CPU and a C++ compiler here "
                      "(see the log for why the kernel is unavailable)")
    self.packed = can if packed is None else packed
    program = _program(config, sharding, self.packed)
    self.model = Transformer(config, sharding)  # the model as it reads `self.params`
    if sharding is not None:
      params = jax.device_put(params, param_shardings(config, sharding))
    self.params = params
    self._run_params = program.store(params)  # what the jitted programs take (see `_Program`)
    self.prefilled_tokens = 0  # real (non-pad) tokens fed by prefill so far: chat tests count these
    self.last_timing: dict[str, float] = {}
    self._extend, self._prefill, self._decode = program.extend, program.prefill, program.decode

  # -- sharding helpers ----------------------------------------------------------------------------------
  def _put_batch(self, x: np.ndarray) -> jax.Array:
    if self.sharding is None:
      return jnp.asarray(x)
    axes = ("batch",) + (None,) * (x.ndim - 1)
    return jax.device_put(x, self.sharding.sharding(axes, x.shape))

  def new_cache(self, batch: int, max_len: int) -> kv_cache.Cache:
    cache = kv_cache.init_cache(self.config, batch, max_len)
    if self.sharding is not None:
      cache = jax.device_put(cache, jax.tree.map(
          lambda a, x: self.sharding.sharding(a, x.shape), kv_cache.cache_axes(cache), cache,
          is_leaf=lambda a: isinstance(a, tuple)))
    return cache

  # -- host side -----------------------------------------------------------------------------------------
  def encode_prompts(self, prompts: Sequence[str | Sequence[int]], add_bos: bool = True) -> list[list[int]]:
    out = []
    for p in prompts:
      ids = self.tokenizer.encode(p, add_bos=add_bos) if isinstance(p, str) else [int(i) for i in p]
      if not ids:
        raise UserError("empty prompt: give at least one token (BOS is added to text prompts by default)")
      out.append(ids)
    return out

  def start(self, rows: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: SamplingParams,
            stop: stopping.StopRules, state: DecodeState | None = None) -> DecodeState:
    """Prefills `rows` (token ids) and samples the first token of each row.

    With `state`, the rows continue that state's rows (chat): its unfed `last` tokens must be included in
    `rows` by the caller, and the ids are appended at `state.next_pos`.
    """
    if max_new_tokens < 1:
      raise UserError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    b = len(rows)
    lengths = np.array([len(r) for r in rows])
    if lengths.min() < 1:
      raise UserError("cannot prefill an empty row")
    start_pos = np.zeros(b, np.int64) if state is None else np.asarray(state.next_pos)
    chunk = self.prefill_chunk
    t = bucket_length(int(lengths.max()), chunk)
    need = int((start_pos + lengths).max()) + max_new_tokens
    if need > self.config.max_seq_len:
      raise UserError(f"prompt ({int((start_pos + lengths).max())} tokens) + max_new_tokens "
                      f"({max_new_tokens}) exceeds the model's context of {self.config.max_seq_len} tokens")
    s = cache_bucket(need, self.min_cache)
    tokens = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    positions = np.zeros((b, t), np.int32)
    for i, r in enumerate(rows):
      n = len(r)
      tokens[i, t - n:] = r
      mask[i, t - n:] = True
      positions[i, t - n:] = start_pos[i] + np.arange(n)
    if state is None:
      cache = self.new_cache(b, s)
    else:
      cache = state.cache
      if max(x["pos"].shape[1] for x in cache.values()) < s:
        cache = grow_cache(cache, self.config, s)
    strategy = sampling.strategy(self.config.vocab_size)
    values = sampling.values()
    key = jax.random.key(sampling.seed) if state is None else state.key
    tic = time.perf_counter()
    for c0 in range(0, t - chunk, chunk):  # all but the last chunk
      sl = slice(c0, c0 + chunk)
      cache = self._extend(self._run_params, self._put_batch(tokens[:, sl]), self._put_batch(positions[:, sl]),
                           self._put_batch(mask[:, sl]), cache)
    sl = slice(max(0, t - chunk), t)
    new = self._prefill(self._run_params, self._put_batch(tokens[:, sl]), self._put_batch(positions[:, sl]),
                        self._put_batch(mask[:, sl]), cache, key, values, jnp.asarray(stop.id_array()),
                        jnp.asarray(max_new_tokens, jnp.int32), strategy=strategy, out_len=s)
    new.last.block_until_ready()
    self.last_timing["prefill_s"] = time.perf_counter() - tic
    self.prefilled_tokens += int(lengths.sum())
    return new

  def decode(self, state: DecodeState, steps: int, sampling: SamplingParams,
             stop: stopping.StopRules) -> DecodeState:
    """Runs up to `steps` more decode steps (the state is donated: use the returned one)."""
    return self._decode(self._run_params, state, jnp.asarray(steps, jnp.int32), sampling.values(),
                        jnp.asarray(stop.id_array()), strategy=sampling.strategy(self.config.vocab_size))

  def _stop_rules(self, stop_ids, stop_strings) -> stopping.StopRules:
    ids = stopping.default_stop_ids(self.tokenizer) if stop_ids is None else tuple(int(i) for i in stop_ids)
    return stopping.StopRules(ids, tuple(stop_strings or ()))

  def stream(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
             sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
             stop_strings: Sequence[str] = (), add_bos: bool = True, interval: int = 1,
             results: list | None = None) -> Iterator[list[str]]:
    """Yields, every `interval` decode steps, one text delta per row (possibly empty).

    Deltas never split a multi-byte character and stop at the stop (token or string). When done, `results`
    (if given) is filled with one `Completion` per row.
    """
    rows = self.encode_prompts(prompts, add_bos)
    stop = self._stop_rules(stop_ids, stop_strings)
    state = self.start(rows, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop)
    yield from self._drive(state, rows, max_new_tokens, sampling, stop, interval, results)

  def _drive(self, state, rows, max_new_tokens, sampling, stop, interval, results):
    b = len(rows)
    decoders = [IncrementalDecoder(self.tokenizer) for _ in range(b)]
    emitted = [0] * b  # tokens of the row handed to its decoder
    finished: list[tuple[str, int | None] | None] = [None] * b
    cut_text: list[str | None] = [None] * b
    tic = time.perf_counter()
    while True:
      step = int(state.step)
      host_tokens = np.asarray(state.tokens[:, :step])
      host_done = np.asarray(state.done)
      deltas = [""] * b
      stop_rows = []
      for i in range(b):
        if finished[i] is not None:
          continue
        seq = host_tokens[i].tolist()
        kept, sid = stopping.cut_at_stop_id(seq, stop.stop_ids)
        new_ids = kept[emitted[i]:]
        emitted[i] = len(kept)
        delta = decoders[i].push(new_ids)
        if stop.stop_strings:
          text = decoders[i].text
          j = stopping.find_stop_string(text, stop.stop_strings)
          if j >= 0:
            already = len(text) - len(delta)
            delta = text[already:j] if j > already else ""
            cut_text[i] = text[:j]
            finished[i] = ("stop_string", None)
            stop_rows.append(i)
        if finished[i] is None and sid is not None:
          delta += decoders[i].flush()
          finished[i] = ("stop_id", sid)
        deltas[i] = delta
      if any(deltas):
        yield deltas
      if stop_rows and not all(f is not None for f in finished):
        state = state._replace(done=state.done.at[np.array(stop_rows)].set(True))
      if all(f is not None for f in finished) or step >= max_new_tokens or bool(host_done.all()):
        break
      state = self.decode(state, interval, sampling, stop)
    self.last_timing["decode_s"] = time.perf_counter() - tic
    self.last_timing["decode_steps"] = int(state.step) - 1
    tails = []
    for i in range(b):
      if finished[i] is None:
        tails.append(decoders[i].flush())
        finished[i] = ("length", None)
      else:
        tails.append("")
    if any(tails):
      yield tails
    self.final_state = state
    if results is not None:
      results.clear()
      host_tokens = np.asarray(state.tokens[:, :int(state.step)])
      host_lp = np.asarray(state.logprobs[:, :int(state.step)])
      for i in range(b):
        reason, sid = finished[i]
        toks, _ = stopping.cut_at_stop_id(host_tokens[i].tolist(), stop.stop_ids)
        text = cut_text[i] if cut_text[i] is not None else decoders[i].text
        if reason == "stop_string":  # the shortest prefix of tokens whose text holds the stop string
          n = next(n for n in range(1, len(toks) + 1) if stopping.find_stop_string(
              self.tokenizer.decode(toks[:n]), stop.stop_strings) >= 0)
          toks = toks[:n]
        results.append(Completion(text=text, tokens=toks, prompt_tokens=len(rows[i]), stop_reason=reason,
                                  stop_id=sid, logprobs=host_lp[i, :len(toks)].tolist()))

  def generate(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
               sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
               stop_strings: Sequence[str] = (), add_bos: bool = True,
               on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Completes each prompt (text, or token ids used as given). One `Completion` per prompt.

    Stops a row on `stop_ids` (default: eos and end_of_turn) and `stop_strings`. `on_text(row, delta)` is
    called as text is produced (streaming); without it and without stop strings the whole decode is one
    call of the jitted loop.
    """
    stream = on_text is not None
    interval = 1 if stream else (8 if stop_strings else max_new_tokens)
    results: list[Completion] = []
    for deltas in self.stream(prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                              stop_strings=stop_strings, add_bos=add_bos, interval=interval, results=results):
      if stream:
        for i, d in enumerate(deltas):
          if d:
            on_text(i, d)
    return results
