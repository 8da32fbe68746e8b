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

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gemma_jax import checkpoint as ckpt_lib
from gemma_jax.errors import ConfigError, Interrupted, UserError
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import flatten, init_params, param_shapes, param_shardings
from gemma_jax.model.sharding import ShardingContext, make_mesh
from gemma_jax.model.transformer import Transformer
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.training import checkpointing, optim, run_data, state as state_lib, step as step_lib
from gemma_jax.training.batches import global_batch, stack_microbatches
from gemma_jax.training.dpo import dpo_loss
from gemma_jax.training.orpo import orpo_loss
from gemma_jax.training.sft import sft_loss
from gemma_jax.training.simpo import simpo_loss
from gemma_jax.training.metrics import MetricsWriter, jsonable
from gemma_jax.training.run_config import OBJECTIVES, model_overrides, validate_run_config
from gemma_jax.training.signals import SignalCatcher
from gemma_jax.training.workdir import Workdir

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
  skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient)


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
  overrides = model_overrides(config)
  if overrides:
    try:
      changed = model_config.replace(**overrides)
    except TypeError as e:
      raise ConfigError(f"model_overrides: {e}") from None
    if path is not None:
      before, after = flatten(param_shapes(model_config)), flatten(param_shapes(changed))
      if {k: v.shape for k, v in before.items()} != {k: v.shape for k, v in after.items()}:
        raise ConfigError(f"model_overrides {overrides} change the parameter shapes of the checkpoint {path}; "
                          "shape-changing overrides apply to a random init only (init_from=<preset name>)")
    model_config = changed
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
# Checks before any work


def check_tokenizer_fits(tokenizer: Tokenizer, model_config: TransformerConfig, where: str) -> None:
  """A tokenizer with ids past the embedding table would make every step non-finite (or read garbage rows)."""
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ConfigError(f"the tokenizer ({where}) has {tokenizer.vocab_size} pieces but the model's embedding has "
                      f"{model_config.vocab_size} rows, so ids >= {model_config.vocab_size} have none; use the "
                      "tokenizer the model was trained with (the checkpoint's own, the default)")


def check_resumable(run_ckpt: checkpointing.RunCheckpointer, step: int, model_config: TransformerConfig,
                    config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a run checkpoint made for another model or objective, saying what differs."""
  meta = run_ckpt.read_meta(step)
  saved_model, saved_run = meta.get("model") or {}, meta.get("run") or {}
  now = model_config.to_dict()
  diffs = [f"{k}: {saved_model.get(k)!r} saved, {now.get(k)!r} now" for k in sorted(now)
           if k in saved_model and saved_model[k] != now[k]]
  if saved_run.get("objective") not in (None, config.objective):
    diffs.append(f"objective: {saved_run.get('objective')!r} saved, {config.objective!r} now")
  if diffs:
    raise ConfigError(f"{workdir} holds a run of another model or objective (step {step}; "
                      f"{'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}). Its checkpoints are kept: to "
                      "resume it, run with its own config (config.json); to start this run, give it another "
                      "--workdir")


def _inject_steps(spec: str) -> set[int]:
  try:
    return {int(s) for s in str(spec).split(",") if s.strip()}
  except ValueError:
    raise ConfigError(f"inject_nonfinite={spec!r}: expected comma-separated step numbers") from None


# ---------------------------------------------------------------------------------------------------------
# The loop


def train(config: ml_collections.ConfigDict, workdir: str) -> Result:
  """Trains as `config` says, writing everything under `workdir`; resumes from it when it holds a run."""
  validate_run_config(config)
  with Workdir.open(workdir) as wd, SignalCatcher() as signals:
    return _train(config, wd, signals)


def _train(config: ml_collections.ConfigDict, wd: Workdir, signals: SignalCatcher) -> Result:
  workdir = wd.path
  primary = jax.process_index() == 0
  single = jax.process_count() == 1  # a signal may interrupt reading data / evaluating (multi-host: no)
  if primary:
    ckpt_lib.remove_stale_temporaries(workdir)  # final.tmp-* / best.tmp-* of a killed run (we hold the lock)

  # -- model, mesh, data ---------------------------------------------------------------------------------
  start = resolve_start(config)
  model_config = training_model_config(config, start.config)
  check_tokenizer_fits(start.tokenizer, model_config, config.tokenizer or f"{start.path or config.init_from}")
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
  if primary:
    print(data.summary(), flush=True)
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

  resume_step = None if config.checkpoint.resume_step < 0 else config.checkpoint.resume_step
  run_ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
                                           keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                           verify=config.checkpoint.verify, resume_step=resume_step)
  latest = run_ckpt.latest_step()
  if latest is not None:
    check_resumable(run_ckpt, latest, model_config, config, workdir)
  wd.write_config(config)  # the run is accepted: from here on the work directory is this run's

  aux, aux_shardings = make_aux(config, start, model_config, ctx)
  train_step = step_lib.jit_train_step(loss_fn=loss_fn, optimizer=optimizer, schedule=schedule, mesh=mesh,
                                       state_shardings=s_shardings, aux_shardings=aux_shardings)
  eval_step = step_lib.jit_eval_step(loss_fn=make_loss_fn(config, model, model_config), mesh=mesh,
                                     param_shardings=p_shardings, aux_shardings=aux_shardings)
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

  writer = MetricsWriter(workdir, resume_step=step)  # rows of steps that will run again are dropped
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

  def save_run(force: bool = False) -> bool:
    return run_ckpt.save(step, state, data_state, {**meta_base, "best_eval_loss": _finite(best_eval)},
                         force=force)

  try:
    while step < num_steps:
      try:
        with contextlib.nullcontext() if single else signals.deferred():
          local = [next(data.train) for _ in range(config.grad_accum)]
      except Interrupted as e:
        signals.caught = e.signum
        local = None
      if local is not None:
        with signals.deferred():
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
          eval_now = bool(config.eval.every) and step % config.eval.every == 0 and step < num_steps
          if eval_now:
            handle(pending)
            pending = None
        if eval_now and not signals.caught:
          try:
            with contextlib.nullcontext() if single else signals.deferred():
              last_eval, best_eval = _evaluate(config, data, eval_step, state, aux, mesh, step, writer, start,
                                               model_config, ctx, best_eval)
          except Interrupted as e:
            signals.caught = e.signum
      with signals.deferred():
        saved = save_run()
        if signals.any_caught():
          if pending is not None:
            handle(pending)
            pending = None
          if not saved:
            save_run(force=True)
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
    with signals.deferred():
      run_ckpt.wait()

  final_dir = None
  skipped = int(jax.device_get(state.nonfinite_total))
  if not stopped_by_signal:
    with signals.deferred():
      save_run(force=True)
      run_ckpt.wait()
    if data.has_eval and step in writer.eval_rows:  # evaluated before a kill: not logged twice
      last_eval = {k: v for k, v in writer.eval_rows[step].items() if k.startswith("eval/") and k != "eval/samples"}
    elif data.has_eval:
      last_eval, best_eval = _evaluate(config, data, eval_step, state, aux, mesh, step, writer, start,
                                       model_config, ctx, best_eval)
    writer.write(step, {"run/steps": step, "run/skipped_steps": skipped})
    if step and skipped > config.max_skipped_fraction * step:
      run_ckpt.close()
      writer.close()
      raise TrainingStopped(f"{skipped} of {step} steps were skipped (non-finite loss or gradient), more than "
                            f"max_skipped_fraction={config.max_skipped_fraction}: the model learned little, so no "
                            f"final/ model was written (run checkpoints: {run_ckpt.directory}). Lower optim.lr, "
                            "check the data and tokenizer, or raise max_skipped_fraction")
    final_dir = os.path.join(workdir, "final")
    with signals.deferred():
      save_model(final_dir, state.params, start, model_config, config, step=step,
                 metrics=last_eval or last_metrics, skipped_steps=skipped)
  if skipped:
    _log(f"{skipped} of {step} steps were skipped (non-finite loss or gradient; nothing applied from them)")
  run_ckpt.close()
  writer.close()
  return Result(step=step, metrics=last_metrics, eval_metrics=last_eval, final_dir=final_dir,
                stopped_by_signal=stopped_by_signal, skipped_steps=skipped)


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
               metrics: dict[str, Any], skipped_steps: int = 0) -> None:
  """Our checkpoint format: the saved config (not the training dtypes/remat), tokenizer and template."""
  saved_config = start.config.replace(param_dtype=model_config.param_dtype)
  kind = "it" if start.template.is_chat else start.kind
  provenance = {"trained": {"from": config.init_from, "objective": config.objective, "steps": int(step),
                            "skipped_steps": int(skipped_steps), "template": start.template.name,
                            "chat_fine_tuned": bool(start.template.is_chat)}}
  extra = {"train_metrics": {k: jsonable(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
  ckpt_lib.save(path, config=saved_config, params=params, tokenizer=start.tokenizer,
                template=start.template.to_dict(), kind=kind, provenance=provenance, extra=extra)
