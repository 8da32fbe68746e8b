"""The training loop: `train(config, workdir)`, read top to bottom.

    init (checkpoint, real model or preset) -> mesh, shardings -> optimizer, state (or resume the latest run
    checkpoint) -> for each step: A host-local microbatches -> one global batch -> jitted step -> log ->
    run checkpoint every N steps -> eval every N steps (+ best model) -> final checkpoint in our format

Work directory:
    config.json          the run config
    metrics.jsonl        one JSON line per logged step and per evaluation
    events.*             TensorBoard event files (tensorboardX)
    checkpoints/<step>/  run checkpoints (train state + data-iterator state), the latest `checkpoint.keep`
    best/                the best model by eval loss (our checkpoint format)
    final/               the trained model (our format: config, tokenizer, template): `sample.sample --ckpt=`

Running `train` again on the same work directory resumes from the latest run checkpoint; the result is
bitwise the same as an uninterrupted run (CPU, f32). SIGTERM / SIGINT save a run checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from gemma_jax import checkpoint as ckpt_lib
from gemma_jax.errors import ConfigError, UserError
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import init_params, param_shapes, param_shardings
from gemma_jax.model.sharding import ShardingContext, make_mesh
from gemma_jax.model.transformer import Transformer
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.training import checkpointing, optim, run_data, state as state_lib, step as step_lib
from gemma_jax.training.dpo import dpo_loss
from gemma_jax.training.orpo import orpo_loss
from gemma_jax.training.sft import sft_loss
from gemma_jax.training.simpo import simpo_loss
from gemma_jax.training.run_config import OBJECTIVES

PREFERENCE = ("orpo", "dpo", "simpo")
REAL_PREFIX = "real:"


class TrainingStopped(UserError):
  """The run stopped on purpose (too many non-finite steps in a row); the message says why and what to do."""


@dataclasses.dataclass
class Result:
  """What `train` returns: the final step, the last logged train/eval metrics, the paths written."""

  step: int
  metrics: dict[str, float]
  eval_metrics: dict[str, float]
  final_dir: str | None
  stopped_by_signal: bool = False


# ---------------------------------------------------------------------------------------------------------
# The model to start from


@dataclasses.dataclass
class Start:
  config: TransformerConfig  # as saved (no training-only overrides)
  tokenizer: Tokenizer
  template: Any  # ChatTemplate
  kind: str | None
  path: str | None  # our checkpoint, or None for a random init


def resolve_start(config: ml_collections.ConfigDict) -> Start:
  """The starting model's config, tokenizer and template (no parameters are read)."""
  from gemma_jax import templates
  src = config.init_from
  if not src:
    raise ConfigError("init_from is empty: set --config.init_from=PATH (a gemma_jax checkpoint; convert HF / "
                      "GGUF / Flax weights with `python -m gemma_jax.convert`), 'real:gemma3-270m', or a preset "
                      "name for a random init")
  tokenizer = Tokenizer(config.tokenizer) if config.tokenizer else None
  if src.startswith(REAL_PREFIX):
    from gemma_jax import real_model
    if src[len(REAL_PREFIX):] != "gemma3-270m":
      raise ConfigError(f"init_from={src!r}: the only real model shipped is 'real:gemma3-270m'")
    src = real_model.real_model_path()
  if os.path.isdir(src):
    meta = ckpt_lib.read_metadata(src)
    model_config = TransformerConfig.from_dict(meta["config"])
    if tokenizer is None:
      if not meta.get("tokenizer"):
        raise ConfigError(f"init_from={src}: the checkpoint has no tokenizer; set --config.tokenizer=PATH")
      tokenizer = Tokenizer(os.path.join(src, meta["tokenizer"]))
    template = meta.get("template")
    kind = meta.get("kind")
    path = src
  else:
    try:
      model_config = TransformerConfig.from_preset(src)
    except ConfigError:
      raise ConfigError(f"init_from={src!r} is neither a gemma_jax checkpoint directory nor a preset name "
                        "(convert HF/GGUF/Flax weights with `python -m gemma_jax.convert` first)") from None
    if tokenizer is None:
      raise ConfigError(f"init_from={src!r} is a random init: set --config.tokenizer=PATH (a SentencePiece "
                        "model)")
    template, kind, path = None, None, None
  if config.model_overrides:
    model_config = model_config.replace(**dict(config.model_overrides))
  if config.data.template:
    template = templates.get_template(config.data.template)
  elif template is not None:
    template = templates.ChatTemplate.from_dict(template)
  else:
    template = templates.template_for_family(model_config.family)
  return Start(model_config, tokenizer, template, kind, path)


def training_model_config(config: ml_collections.ConfigDict, saved: TransformerConfig) -> TransformerConfig:
  """The saved model config with the run's compute dtype, master-weight dtype and remat policy."""
  return saved.replace(dtype=config.compute_dtype, param_dtype=config.param_dtype, remat=config.remat)


def make_loss_fn(config: ml_collections.ConfigDict, model: Transformer, model_config: TransformerConfig):
  """`loss_fn(params, batch, aux) -> (loss, metrics)` for the configured objective (aux: DPO's reference params)."""
  c = config.loss
  chunk = {"chunk_size": c.chunk_size or None, "max_saved_bytes": c.saved_logits_mib << 20}
  if config.objective == "orpo":
    return lambda p, b, aux: orpo_loss(p, b, model=model, config=model_config, beta=c.orpo_lambda,
                                       nll_target=c.nll_target, **chunk)
  if config.objective == "sft":
    return lambda p, b, aux: sft_loss(p, b, model=model, config=model_config, **chunk)
  if config.objective == "dpo":
    return lambda p, b, aux: dpo_loss(p, b, model=model, config=model_config, beta=c.beta, reference_params=aux,
                                      label_smoothing=c.label_smoothing, **chunk)
  if config.objective == "simpo":
    return lambda p, b, aux: simpo_loss(p, b, model=model, config=model_config, beta=c.beta, gamma=c.gamma,
                                        label_smoothing=c.label_smoothing, **chunk)
  raise ConfigError(f"objective={config.objective!r}: use one of {', '.join(OBJECTIVES)}")


def make_aux(config: ml_collections.ConfigDict, start: Start, model_config: TransformerConfig,
             ctx: ShardingContext) -> tuple[Any, Any]:
  """(aux, its shardings): DPO's frozen reference params (the starting model), else (None, None)."""
  if config.objective != "dpo":
    return None, None
  return _initial_params(start, model_config, ctx, config.seed), param_shardings(model_config, ctx)


# ---------------------------------------------------------------------------------------------------------
# Batches: host-local numpy -> one global array per field


def stack_microbatches(micro: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """A list of A host-local [R_local, ...] batches -> [A, R_local, ...], right-padded to their longest T.

  Every host pads to the same T: the data iterator sizes each batch by the global batch's longest row.
  """
  t = max(m["tokens"].shape[1] for m in micro)
  return {k: np.stack([_pad_axis(np.asarray(m[k]), t, axis=1) for m in micro]) for k in micro[0]}


def _pad_axis(x: np.ndarray, t: int, axis: int) -> np.ndarray:
  """Right-pads axis `axis` (the token axis) to length t with zeros (False for masks)."""
  if x.ndim <= axis or x.shape[axis] == t:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, t - x.shape[axis])
  return np.pad(x, pad)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local [A, R_local, ...] arrays -> global [A, R_local * processes, ...] arrays on the mesh.

  Process i holds rows [i * R_local, (i + 1) * R_local) of every global batch (the data iterator's split), so
  the global rows are exactly the batch one process would have built alone.
  """
  sharding = step_lib.batch_sharding(mesh)
  out = {}
  for k, x in local.items():
    shape = (x.shape[0], x.shape[1] * jax.process_count(), *x.shape[2:])
    out[k] = jax.make_array_from_process_local_data(sharding, x, shape)
  return out


# ---------------------------------------------------------------------------------------------------------
# Logging


class MetricsWriter:
  """metrics.jsonl + TensorBoard events, written by process 0 only."""

  def __init__(self, workdir: str):
    self.primary = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a") if self.primary else None
    self._tb = None
    if self.primary:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(workdir)

  def write(self, step: int, metrics: dict[str, Any], text: dict[str, str] | None = None) -> None:
    if not self.primary:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    for k, v in (text or {}).items():
      self._tb.add_text(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.primary:
      self._file.close()
      self._tb.close()


def _jsonable(v):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # "nan" / "inf": JSON has no such numbers
  return v


class SignalCatcher:
  """SIGTERM / SIGINT set a flag that the loop checks between steps (a second SIGINT interrupts at once)."""

  def __init__(self):
    self.caught: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    if self.caught == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.caught = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def any_caught(self) -> bool:
    """True if a signal reached any process (a collective on multi-host runs)."""
    flag = self.caught is not None
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


# ---------------------------------------------------------------------------------------------------------
# The loop


def validate(config: ml_collections.ConfigDict) -> None:
  if config.objective not in OBJECTIVES:
    raise ConfigError(f"objective={config.objective!r}: use one of {', '.join(OBJECTIVES)}")
  if config.batch_size <= 0 or config.grad_accum <= 0:
    raise ConfigError("batch_size and grad_accum must be > 0")
  if config.batch_size % config.grad_accum:
    raise ConfigError(f"batch_size={config.batch_size} must be a multiple of grad_accum={config.grad_accum}")
  if config.max_nonfinite <= 0:
    raise ConfigError(f"max_nonfinite={config.max_nonfinite}: must be > 0")


def _inject_steps(spec: str) -> set[int]:
  try:
    return {int(s) for s in str(spec).split(",") if s.strip()}
  except ValueError:
    raise ConfigError(f"inject_nonfinite={spec!r}: expected comma-separated step numbers") from None


def train(config: ml_collections.ConfigDict, workdir: str) -> Result:
  """Trains as `config` says, writing everything under `workdir`; resumes from it when it holds a run."""
  validate(config)
  workdir = os.path.abspath(workdir)
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  # -- model, mesh, data ---------------------------------------------------------------------------------
  start = resolve_start(config)
  model_config = training_model_config(config, start.config)
  mesh = make_mesh(config.mesh)
  ctx = ShardingContext(mesh)
  micro = config.batch_size // config.grad_accum
  rows = micro * (2 if config.objective in PREFERENCE else 1)
  if rows % step_lib.row_shards(mesh):
    raise ConfigError(f"a microbatch has {rows} rows (batch_size / grad_accum = {micro} examples), not a "
                      f"multiple of the mesh's data x fsdp size ({step_lib.row_shards(mesh)}); change batch_size, "
                      "grad_accum or mesh")
  data = run_data.build(config, start.tokenizer, start.template, micro_batch=micro,
                        process_index=jax.process_index(), process_count=jax.process_count())
  num_steps = config.num_steps or max(1, int(config.num_epochs * data.steps_per_epoch(config.batch_size)))

  # -- optimizer, loss, state ----------------------------------------------------------------------------
  optimizer, schedule = optim.optimizer_from_config(config.optim, num_steps)
  model = Transformer(model_config, ctx)
  loss_fn = make_loss_fn(config, model, model_config)
  inject = _inject_steps(config.inject_nonfinite)
  if inject:
    base_loss_fn = loss_fn

    def loss_fn(params, batch, aux):  # noqa: F811 -- fault injection for the tests
      batch = dict(batch)
      poison = batch.pop("inject_nonfinite")
      loss, metrics = base_loss_fn(params, batch, aux)
      return loss * jnp.mean(poison), metrics

  shapes = param_shapes(model_config)
  p_shardings = param_shardings(model_config, ctx)
  s_shardings = state_lib.state_shardings(optimizer, shapes, p_shardings, mesh)
  aux, aux_shardings = make_aux(config, start, model_config, ctx)
  train_step = step_lib.jit_train_step(loss_fn=loss_fn, optimizer=optimizer, schedule=schedule, mesh=mesh,
                                       state_shardings=s_shardings, aux_shardings=aux_shardings)
  eval_step = step_lib.jit_eval_step(loss_fn=make_loss_fn(config, model, model_config), mesh=mesh,
                                     param_shardings=p_shardings, aux_shardings=aux_shardings)

  run_ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
                                           keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  latest = run_ckpt.latest_step()
  best_eval = math.inf
  if latest is not None:
    target = state_lib.abstract_state(optimizer, shapes, s_shardings)
    state, data_state, meta = run_ckpt.restore(latest, target)
    data.train.set_state(data_state)
    best_eval = meta.get("best_eval_loss")
    best_eval = math.inf if best_eval is None else float(best_eval)
    _log(f"resumed from {run_ckpt.directory}/{latest}")
  else:
    params = _initial_params(start, model_config, ctx, config.seed)
    state = jax.jit(lambda p: state_lib.create(p, optimizer, config.seed), in_shardings=(p_shardings,),
                    out_shardings=s_shardings, donate_argnums=(0,))(params)
    del params
  step = int(jax.device_get(state.step))

  writer = MetricsWriter(workdir)
  bar = _progress(step, num_steps, enabled=config.progress and primary)
  meta_base = {"run": json.loads(config.to_json_best_effort()), "model": model_config.to_dict()}
  last_metrics: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  pending = None  # (step, device metrics, tokens, time): read one step late, so the device never waits
  stopped_by_signal = False
  data_state = data.train.get_state()
  t_last = time.perf_counter()

  def handle(p) -> None:
    nonlocal last_metrics, t_last
    s, m, tokens, t0 = p
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    now = time.perf_counter()
    m["tokens_per_s"] = tokens / max(now - t_last, 1e-9)
    t_last = now
    last_metrics = m
    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
    bar.update(1)
    if s % config.log_every == 0 or s == num_steps or m["nonfinite"]:
      writer.write(s, m)
    if m["nonfinite_run"] >= config.max_nonfinite:
      raise TrainingStopped(
          f"stopped at step {s}: {config.max_nonfinite} steps in a row had a non-finite loss or gradient "
          f"(loss={m['loss']}); nothing was applied from them. Saved run checkpoints: "
          f"{run_ckpt.all_steps() or 'none'} in {run_ckpt.directory}. Lower optim.lr, check the data, or "
          "raise max_nonfinite")

  try:
    with SignalCatcher() as signals:
      while step < num_steps:
        local = []
        for _ in range(config.grad_accum):
          local.append(next(data.train))
        data_state = data.train.get_state()
        host = stack_microbatches(local)
        if inject:
          poison = np.float32(np.nan if step + 1 in inject else 1.0)
          host["inject_nonfinite"] = np.full(host["tokens"].shape[:2], poison, np.float32)
        tokens = int(host["input_mask"].sum()) * jax.process_count()
        batch = global_batch(host, mesh)
        state, metrics = train_step(state, batch, aux)
        step += 1
        if pending is not None:
          handle(pending)
        pending = (step, metrics, tokens, time.perf_counter())

        if config.eval.every and step % config.eval.every == 0 and step < num_steps:
          handle(pending)
          pending = None
          last_eval, best_eval = _evaluate(config, data, eval_step, state, aux, mesh, step, writer, start,
                                           model_config, ctx, best_eval)
        saved = run_ckpt.save(step, state, data_state, {**meta_base, "best_eval_loss": _finite(best_eval)})
        if signals.any_caught():
          if pending is not None:
            handle(pending)
            pending = None
          if not saved:
            run_ckpt.save(step, state, data_state, {**meta_base, "best_eval_loss": _finite(best_eval)},
                          force=True)
          run_ckpt.wait()
          _log(f"stopped by signal at step {step}; run checkpoint saved in {run_ckpt.directory}; run the same "
               "command to resume")
          stopped_by_signal = True
          break
      if pending is not None:
        handle(pending)
        pending = None
  finally:
    bar.close()
    run_ckpt.wait()

  final_dir = None
  if not stopped_by_signal:
    if data.has_eval:
      last_eval, best_eval = _evaluate(config, data, eval_step, state, aux, mesh, step, writer, start,
                                       model_config, ctx, best_eval)
    run_ckpt.save(step, state, data_state, {**meta_base, "best_eval_loss": _finite(best_eval)},
                  force=True)
    run_ckpt.wait()
    final_dir = os.path.join(workdir, "final")
    save_model(final_dir, state.params, start, model_config, config, step=step, metrics=last_eval or last_metrics)
  run_ckpt.close()
  writer.close()
  return Result(step=step, metrics=last_metrics, eval_metrics=last_eval, final_dir=final_dir,
                stopped_by_signal=stopped_by_signal)


def _finite(x: float) -> float | None:
  return x if math.isfinite(x) else None


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _progress(step: int, total: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=step, disable=not enabled, unit="step", dynamic_ncols=True)


def _initial_params(start: Start, model_config: TransformerConfig, ctx: ShardingContext, seed: int):
  if start.path is None:
    return init_params(model_config, jax.random.key(seed), ctx)
  ck = ckpt_lib.load(start.path, sharding=ctx, dtype=model_config.param_dtype)
  return ck.params


# ---------------------------------------------------------------------------------------------------------
# Evaluation and the saved model


def _evaluate(config, data, eval_step, state, aux, mesh, step, writer, start, model_config, ctx,
              best_eval) -> tuple[dict[str, float], float]:
  """Mean loss and metrics over the held-out batches, greedy samples, and the best model when it improves."""
  if not data.has_eval:
    return {}, best_eval
  sums: dict[str, float] = {}
  count = 0
  for i, local in enumerate(data.eval_batches()):
    if config.eval.max_batches and i >= config.eval.max_batches:
      break
    host = stack_microbatches([local])
    m = jax.device_get(eval_step(state.params, global_batch(host, mesh), aux))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    count += 1
  metrics = {f"eval/{k}": v / max(count, 1) for k, v in sums.items()}
  text = {}
  if config.eval.num_samples > 0 and jax.process_count() == 1:  # (multi-host runs log no samples)
    samples = _greedy_samples(config, data, state.params, start, model_config, ctx)
    metrics["eval/samples"] = samples
    text = {"eval/samples": "\n\n".join(f"**{s['prompt']}**\n\n{s['completion']}" for s in samples)}
  writer.write(step, {k: v for k, v in metrics.items()}, text)
  loss = metrics.get("eval/loss", math.inf)
  if config.checkpoint.keep_best and math.isfinite(loss) and loss < best_eval:
    best_eval = loss
    save_model(os.path.join(os.path.dirname(writer.path), "best"), state.params, start, model_config, config,
               step=step, metrics={k: v for k, v in metrics.items() if k != "eval/samples"})
  return {k: v for k, v in metrics.items() if k != "eval/samples"}, best_eval


def _greedy_samples(config, data, params, start: Start, model_config, ctx) -> list[dict[str, str]]:
  """Greedy completions of the first held-out prompts, with the template's stop tokens."""
  from gemma_jax.sampling import Sampler, SamplingParams
  prompts = data.sample_prompts(config.eval.num_samples)
  if not prompts:
    return []
  sampler = Sampler(start.config.replace(param_dtype=model_config.param_dtype), params, start.tokenizer,
                    sharding=ctx)
  out = sampler.generate([p.tolist() for p in prompts], max_new_tokens=config.eval.sample_tokens,
                         sampling=SamplingParams(), stop_ids=start.template.stop_token_ids(start.tokenizer))
  return [{"prompt": start.tokenizer.decode(p.tolist()), "completion": c.text} for p, c in zip(prompts, out)]


def save_model(path: str, params, start: Start, model_config: TransformerConfig, config, *, step: int,
               metrics: dict[str, Any]) -> None:
  """Our checkpoint format: the saved config (not the training dtypes/remat), tokenizer and template."""
  saved_config = start.config.replace(param_dtype=model_config.param_dtype)
  kind = "it" if start.template.is_chat else start.kind
  provenance = {"trained": {"from": config.init_from, "objective": config.objective, "steps": int(step),
                            "template": start.template.name,
                            "chat_fine_tuned": bool(start.template.is_chat)}}
  extra = {"train_metrics": {k: _jsonable(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
  ckpt_lib.save(path, config=saved_config, params=params, tokenizer=start.tokenizer,
                template=start.template.to_dict(), kind=kind, provenance=provenance, extra=extra)
