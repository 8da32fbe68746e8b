"""The sampler: prompts in, completions out; the host side of prefill + the jitted decode loop.

    prompts -> left-pad to a length bucket -> prefill (chunks on top of the KV cache) -> first token
            -> decode(state, steps) (the jitted loop, `program.py`), `interval` steps per call
            -> host: stop strings, cut at the stop, detokenize, text deltas

Rows of different lengths decode in lockstep: each row has its own positions (a left-padded row gets the
positions it would have alone; padding is never written to the cache). Shapes are bucketed (`buckets.py`);
sliding-window layers keep a ring buffer of window size. The weights are kept as `weight_layout.py` decides.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Generator, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.errors import UserError
from gemma_jax.model import kv_cache, lora
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import param_shardings
from gemma_jax.model.sharding import ShardingContext
from gemma_jax.model.transformer import Transformer
from gemma_jax.progress import progress_bar
from gemma_jax.sampling import stopping
from gemma_jax.sampling.buckets import bucket_length, cache_bucket, grow_cache
from gemma_jax.sampling.program import DecodeState, program
from gemma_jax.sampling.streaming import IncrementalDecoder
from gemma_jax.sampling.strategies import SamplingParams
from gemma_jax.sampling.weight_layout import WeightLayout
from gemma_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Completion:
  """One row's result. `text`/`tokens` are cut at the stop; `stop_reason`: 'stop_id', 'stop_string', 'length';
  `stop_id` / `stop_string`: the token id or the string that ended the row (None otherwise)."""

  text: str
  tokens: list[int]
  prompt_tokens: int
  stop_reason: str
  stop_id: int | None = None
  logprobs: list[float] | None = None  # model log-prob of each of `tokens`
  stop_string: str | None = None


class Stream:
  """A decode in progress. Iterate it (once) for text deltas: one list, one str per row (possibly empty),
  every `interval` decode steps. When the iteration ends, `completions` holds one `Completion` per row and
  `state` the `DecodeState` it ended in, for `Sampler.continue_from` (its cache holds every token fed so far;
  `state.last`, each row's last sampled id, was never fed)."""

  def __init__(self, steps: Generator[list[str], None, tuple[list[Completion], DecodeState]]):
    self._steps = steps
    self.completions: list[Completion] | None = None
    self.state: DecodeState | None = None

  def __iter__(self) -> Iterator[list[str]]:
    if self._steps is None:
      raise RuntimeError("a Stream is iterated once")
    steps, self._steps = self._steps, None
    self.completions, self.state = yield from steps


class Sampler:
  """Samples from a Gemma model. Holds the params (placed on the mesh when `sharding` is given).

  Args:
    config, params, tokenizer: the model.
    sharding: a `ShardingContext`; params, batch and cache are then sharded by the rules table.
    prefill_chunk: longest prompt chunk fed at once (longer prompts are prefilled chunk by chunk).
    min_cache: smallest cache bucket.
    packed: run the matmuls through the packed CPU kernel (`gemma_jax.kernels.packed_matmul`) on a copy of
      the weights stored in its panels (faster decoding at batch > 1, see BENCHMARKS.md). None (default): when
      it can (unsharded, f32, CPU, a C++ compiler here). The copy costs the params' bytes once more. The
      choice is `self.layout` (`weight_layout.WeightLayout`).
    layout: a `WeightLayout` to use instead of the one `packed` chooses (tests compare layouts; 'packed'
      needs the kernel, 'loop' and 'packed' an unsharded model).
  """

  def __init__(self, config: TransformerConfig, params: Any, tokenizer: Tokenizer, *,
               sharding: ShardingContext | None = None, prefill_chunk: int = 512, min_cache: int = 128,
               packed: bool | None = None, layout: WeightLayout | None = None):
    if not config.lora_rank and lora.split(params)[1]:  # the model would read the base and ignore them
      raise ValueError("the params carry LoRA adapters but the config has lora_rank=0: pass the adapted config "
                       "(or fold the adapters in: gemma_jax.model.params.fold_adapters)")
    self.config = config
    self.tokenizer = tokenizer
    self.sharding = sharding
    self.prefill_chunk = prefill_chunk
    self.min_cache = min_cache
    self.layout = WeightLayout.for_backend(config, sharding, packed) if layout is None else layout
    self.packed = self.layout.packed
    prog = program(config, sharding, self.layout)
    self.model = Transformer(config, sharding)  # the model as it reads `self.params`
    if sharding is not None:
      params = jax.device_put(params, param_shardings(config, sharding))
    self.params = params
    self._run_params = self.layout.store(params)  # what the jitted programs take
    self.prefilled_tokens = 0  # real (non-pad) tokens fed by prefill so far: chat tests count these
    self.last_timing: dict[str, float] = {}
    self._extend, self._prefill, self._decode = prog.extend, prog.prefill, prog.decode

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
             pad_to: int | None = None) -> Stream:
    """A `Stream` of `prompts`' completions: iterated, it yields every `interval` decode steps one text delta
    per row (possibly empty); then `completions` and `state` are set.

    Deltas never split a multi-byte character and stop at the stop (token or string). Nothing runs before the
    iteration starts. pad_to: run fewer prompts as `pad_to` rows (one-token filler rows, stopped at once,
    with no delta and no completion), so a short last batch reuses the programs compiled for full ones.
    """
    def steps():
      rows = self.encode_prompts(prompts, add_bos)
      stop = self._stop_rules(stop_ids, stop_strings)
      fill = max(0, (pad_to or 0) - len(rows))
      state = self.start(rows + [rows[-1][-1:]] * fill, max_new_tokens=max_new_tokens, sampling=sampling,
                         stop=stop)
      if fill:  # fillers are done: they decode nothing, and _steps sees the real rows only
        state = state._replace(done=state.done.at[len(rows):].set(True))
      return (yield from self._steps(state, rows, max_new_tokens, sampling, stop, interval))
    return Stream(steps())

  def continue_from(self, state: DecodeState | None, rows: Sequence[Sequence[int]], *, max_new_tokens: int,
                    sampling: SamplingParams, stop: stopping.StopRules, interval: int = 1) -> Stream:
    """Prefills `rows` (token ids, one list per row) after `state`'s rows, now; returns the `Stream` that
    samples on (chat turns).

    state: a finished `Stream.state`, or None for a fresh cache. Its cache is donated once the prefill starts
    (a UserError, e.g. past the context, comes before): use the new `Stream.state` afterwards. Its unfed
    `last` ids are fed only where the caller puts them in `rows`.
    """
    new = self.start(rows, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop, state=state)
    return Stream(self._steps(new, rows, max_new_tokens, sampling, stop, interval))

  def _steps(self, state: DecodeState, rows, max_new_tokens: int, sampling: SamplingParams,
             stop: stopping.StopRules, interval: int
             ) -> Generator[list[str], None, tuple[list[Completion], DecodeState]]:
    """Decodes from a prefilled `state`, yielding the text deltas; returns (completions, final state)."""
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
    completions = []
    host_tokens = np.asarray(state.tokens[:, :int(state.step)])
    host_lp = np.asarray(state.logprobs[:, :int(state.step)])
    for i in range(b):
      reason, sid = finished[i]
      toks, _ = stopping.cut_at_stop_id(host_tokens[i].tolist(), stop.stop_ids)
      text = cut_text[i] if cut_text[i] is not None else decoders[i].text
      matched = None
      if reason == "stop_string":  # the shortest prefix of tokens whose text holds the stop string
        n = next(n for n in range(1, len(toks) + 1) if stopping.find_stop_string(
            self.tokenizer.decode(toks[:n]), stop.stop_strings) >= 0)
        toks = toks[:n]
        matched = next(x for x in stop.stop_strings if decoders[i].text.startswith(x, len(text)))
      completions.append(Completion(text=text, tokens=toks, prompt_tokens=len(rows[i]), stop_reason=reason,
                                    stop_id=sid, logprobs=host_lp[i, :len(toks)].tolist(), stop_string=matched))
    return completions, state

  def generate(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
               sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
               stop_strings: Sequence[str] = (), add_bos: bool = True,
               on_text: Callable[[int, str], None] | None = None,
               batch_size: int | None = None, progress: str | None = None) -> list[Completion]:
    """Completes each prompt (text, or token ids used as given). One `Completion` per prompt.

    Stops a row on `stop_ids` (default: eos and end_of_turn) and `stop_strings`. `on_text(row, delta)` is
    called as text is produced (streaming); without it and without stop strings the whole decode is one
    call of the jitted loop. batch_size: run the prompts in batches of that many rows (at most as many as
    there are prompts), a short last batch padded to it (one compiled program for all); None: all prompts in
    one batch. Each batch starts from `sampling.seed`. progress: a progress bar with this label over the
    prompts (rate, time left), advanced batch by batch; None: none.
    """
    if batch_size is not None and batch_size < 1:
      raise UserError(f"batch_size={batch_size}: must be >= 1")
    stream = on_text is not None
    interval = 1 if stream else (8 if stop_strings else max_new_tokens)
    size = max(1, min(batch_size or len(prompts), len(prompts)))
    out: list[Completion] = []
    bar = progress_bar(total=len(prompts), desc=progress, unit="prompt", disable=progress is None)
    for b0 in range(0, len(prompts), size):
      run = self.stream(prompts[b0:b0 + size], max_new_tokens=max_new_tokens, sampling=sampling,
                        stop_ids=stop_ids, stop_strings=stop_strings, add_bos=add_bos, interval=interval,
                        pad_to=size)
      for deltas in run:
        if stream:
          for i, d in enumerate(deltas):
            if d:
              on_text(b0 + i, d)
      out += run.completions
      bar.update(len(run.completions))
    bar.close()
    return out
