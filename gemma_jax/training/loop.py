"""The training loop: `train(config, workdir)`, read top to bottom.

    init (checkpoint, real model or preset) -> mesh, shardings -> optimizer, state (or resume the latest run
    checkpoint) -> for each step: A host-local microbatches -> one global batch -> jitted step -> log ->
    run checkpoint every N steps -> eval every N steps (+ best model) -> final checkpoint in our format

Console: the data summary, a progress bar (loss, tokens/s: eval and checkpoint time excluded), an eval bar and
a one-line summary per evaluation. Metric names are TRL's (metrics.py).

The starting model is `start.py`, the loss of each objective `objectives.py`, an evaluation `evaluation.py`.

Work directory:
    config.json          the run config
    metrics.jsonl        one JSON line per logged step and per evaluation
    events.*             TensorBoard event files (the tensorboard extra, tensorboardX)
    checkpoints/<step>/  run checkpoints (train state + data-iterator state), the latest `checkpoint.keep` (1)
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

import jax
import jax.numpy as jnp
import ml_collections

from gemma_jax import checkpoint as ckpt_lib
from gemma_jax.errors import ConfigError, Interrupted, UserError
from gemma_jax.model import lora
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import param_shapes, param_shardings
from gemma_jax.model.sharding import ShardingContext, make_mesh
from gemma_jax.model.transformer import Transformer
from gemma_jax.progress import progress_bar
from gemma_jax.training import checkpointing, objectives, optim, run_data, state as state_lib, step as step_lib
from gemma_jax.training.batches import global_batch, stack_microbatches
from gemma_jax.training.evaluation import EVAL_PREFIX, MERGE_KEY, SAMPLES_KEY, STOP_RATE_KEY, Evaluator
from gemma_jax.training.metrics import MetricsWriter
from gemma_jax.training.run_config import validate_run_config
from gemma_jax.training.signals import SignalCatcher
from gemma_jax.training.start import (check_adapters_match, check_tokenizer_fits, initial_params, resolve_start,
                                      save_model, toward_start, training_model_config)
from gemma_jax.training.workdir import Workdir


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
# Checks before any work


def check_resumable(run_ckpt: checkpointing.RunCheckpointer, step: int, model_config: TransformerConfig,
                    config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a run checkpoint made for another model, objective or frozen set, saying what differs."""
  meta = run_ckpt.read_meta(step)
  saved_model, saved_run = meta.get("model") or {}, meta.get("run") or {}
  now = model_config.to_dict()
  diffs = [f"{k}: {saved_model.get(k)!r} saved, {now.get(k)!r} now" for k in sorted(now)
           if k in saved_model and saved_model[k] != now[k]]
  if saved_run.get("objective") not in (None, config.objective):
    diffs.append(f"objective: {saved_run.get('objective')!r} saved, {config.objective!r} now")
  saved_freeze = (saved_run.get("optim") or {}).get("freeze", "")
  if "optim" in saved_run and saved_freeze != config.optim.freeze:  # another optimizer-state tree
    diffs.append(f"optim.freeze: {saved_freeze!r} saved, {config.optim.freeze!r} now")
  if diffs:
    raise ConfigError(f"{workdir} holds a run of another model, objective or frozen set (step {step}; "
                      f"{'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}). Its checkpoints are kept: to "
                      "resume it, run with its own config (config.json); to start this run, give it another "
                      "--workdir")


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
  objective = objectives.get(config.objective)
  start = resolve_start(config)
  model_config = training_model_config(config, start.config)
  check_adapters_match(start, model_config, config.merge_alpha)
  adapters_only = bool(model_config.lora_rank)  # LoRA: only the adapters train, and run checkpoints hold them
  check_tokenizer_fits(start.tokenizer, model_config, config.tokenizer or f"{start.path or config.init_from}")
  mesh = make_mesh(config.mesh)
  ctx = ShardingContext(mesh)
  micro = config.batch_size // config.grad_accum
  rows = micro * objective.rows_per_example
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
  shapes = param_shapes(model_config)
  # None: every parameter trains
  trainable = lora.adapter_mask(shapes) if adapters_only else optim.trainable_mask(shapes, config.optim.freeze)
  max_targets = data.max_targets()  # the head runs on that many positions per row (objectives that allow it)
  loss_fn = objectives.make_loss_fn(config, model, model_config, max_targets)
  p_shardings = param_shardings(model_config, ctx)
  s_shardings = state_lib.state_shardings(optimizer, shapes, p_shardings, mesh, trainable)

  # What a run checkpoint holds: the whole state, or with adapters the state less the frozen base.
  saved_form = (lambda st: st.replace(params=lora.split(st.params)[1])) if adapters_only else (lambda st: st)
  resume_step = None if config.checkpoint.resume_step < 0 else config.checkpoint.resume_step
  run_ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
                                           keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                           verify=config.checkpoint.verify, resume_step=resume_step)
  latest = run_ckpt.latest_step()
  if latest is not None:
    check_resumable(run_ckpt, latest, model_config, config, workdir)
  wd.write_config(config)  # the run is accepted: from here on the work directory is this run's

  # The starting parameters are read once: for a fresh state, as the frozen reference model when the
  # objective needs one (the step's aux), and as the frozen base of adapters (whose reference it also is).
  fresh = latest is None
  separate_reference = objective.needs_reference and not adapters_only
  params = (initial_params(start, model_config, ctx, config.seed)
            if fresh or separate_reference or adapters_only else None)
  aux, aux_shardings = (params, p_shardings) if separate_reference else (None, None)
  train_step = step_lib.jit_train_step(loss_fn=loss_fn, optimizer=optimizer, schedule=schedule, mesh=mesh,
                                       state_shardings=s_shardings, aux_shardings=aux_shardings,
                                       trainable=trainable)
  # Eval scores each example alone (vmapped): its model has no sharding constraints, GSPMD places it.
  eval_loss_fn = objectives.make_loss_fn(config, Transformer(model_config), model_config, max_targets)
  eval_step = step_lib.jit_eval_step(loss_fn=eval_loss_fn, mesh=mesh, param_shardings=p_shardings,
                                     aux_shardings=aux_shardings, rows_per_example=objective.rows_per_example,
                                     sequential=bool(model_config.num_experts))  # ragged_dot does not vmap
  best_eval = math.inf
  if not fresh:
    target = state_lib.abstract_state(optimizer, shapes, s_shardings, trainable)
    state, data_state, meta = run_ckpt.restore(latest, saved_form(target))
    if adapters_only:
      state = state.replace(params=lora.attach(lora.split(params)[0], state.params))
    data.train.set_state(data_state)
    best_eval = meta.get("best_eval_loss")
    best_eval = math.inf if best_eval is None else float(best_eval)
    _log(f"resumed from {run_ckpt.directory}/{latest}")
  else:
    keep = separate_reference  # the reference keeps its buffers: the state gets copies, not them
    create = lambda p: state_lib.create(jax.tree.map(jnp.copy, p) if keep else p, optimizer, config.seed,
                                        trainable)
    state = jax.jit(create, in_shardings=(p_shardings,), out_shardings=s_shardings,
                    donate_argnums=() if keep else (0,))(params)
  del params
  step = int(jax.device_get(state.step))

  writer = MetricsWriter(workdir, resume_step=step)  # rows of steps that will run again are dropped
  bar = progress_bar(total=num_steps, initial=step, unit="step", disable=not (config.progress and primary),
                     leave=True)
  evaluate = Evaluator(config, data, eval_step, mesh, writer, start, model_config, ctx, best_loss=best_eval,
                       echo=bar.write)
  last_eval: dict[str, float] = {}
  if fresh and config.eval.at_start:  # the starting model's numbers, as step 0 (never saved as best/)
    last_eval = evaluate(state, aux, 0, save_best=False)
  meta_base = {"run": json.loads(config.to_json_best_effort()), "model": model_config.to_dict()}
  last_metrics: dict[str, float] = {}
  pending = None  # (step, device metrics, tokens, time): read one step late, so the device never waits
  stopped_by_signal = False
  data_state = data.train.get_state()
  t_last = time.perf_counter()

  def handle(p) -> None:
    nonlocal last_metrics, t_last
    s, m, tokens, t0 = p
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    now = time.perf_counter()
    m["tokens_per_s"] = tokens / max(now - t_last, 1e-9)  # since the previous step, eval and saves excluded
    t_last = now
    if not data.packing:
      m["epoch"] = s * config.batch_size / data.train_examples
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
    return run_ckpt.save(step, saved_form(state), data_state,
                         {**meta_base, "best_eval_loss": _finite(evaluate.best_loss)},
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
          tokens = int(host["input_mask"].sum()) * jax.process_count()
          batch = global_batch(host, mesh)
          state, metrics = train_step(state, batch, aux)
          step += 1
          if pending is not None:
            handle(pending)
          pending = (step, metrics, tokens, time.perf_counter())
          eval_now = bool(config.eval.every) and step % config.eval.every == 0 and step < num_steps
          if eval_now or step % run_ckpt.every == 0:  # read before the pause, so its time is not the step's
            handle(pending)
            pending = None
        if eval_now and not signals.caught:
          try:
            with contextlib.nullcontext() if single else signals.deferred():
              last_eval = evaluate(state, aux, step)
          except Interrupted as e:
            signals.caught = e.signum
          t_last = time.perf_counter()
      with signals.deferred():
        saved = save_run()
        if saved:
          t_last = time.perf_counter()
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
      row = writer.eval_rows[step]
      last_eval = {k: v for k, v in row.items() if k.startswith(EVAL_PREFIX) and k != SAMPLES_KEY}
      evaluate.stop_rate = row.get(STOP_RATE_KEY)
    elif data.has_eval:
      last_eval = evaluate(state, aux, step)
    writer.write(step, {"run/steps": step, "run/skipped_steps": skipped})
    if step and skipped > config.max_skipped_fraction * step:
      run_ckpt.close()
      writer.close()
      raise TrainingStopped(f"{skipped} of {step} steps were skipped (non-finite loss or gradient), more than "
                            f"max_skipped_fraction={config.max_skipped_fraction}: the model learned little, so no "
                            f"final/ model was written (run checkpoints: {run_ckpt.directory}). Lower optim.lr, "
                            "check the data and tokenizer, or raise max_skipped_fraction")
    final_dir = os.path.join(workdir, "final")
    params = state.params
    if config.merge_alpha != 1.0:
      params = toward_start(params, start, model_config, ctx, config.seed, config.merge_alpha)
      # The final model's own metrics: a second eval row at this step, marked with the merge (once: a finished
      # run started again reads it back).
      row = writer.eval_rows.get(step, {})
      if data.has_eval and row.get(MERGE_KEY) == config.merge_alpha:
        last_eval = {k: v for k, v in row.items() if k.startswith(EVAL_PREFIX) and k != SAMPLES_KEY}
        evaluate.stop_rate = row.get(STOP_RATE_KEY)
      elif data.has_eval:
        last_eval = evaluate(state.replace(params=params), aux, step, save_best=False,
                             extra={MERGE_KEY: config.merge_alpha})
    with signals.deferred():
      save_model(final_dir, params, start, model_config, config, step=step,
                 metrics=last_eval or last_metrics, skipped_steps=skipped, examples=evaluate.examples(),
                 stop_rate=evaluate.stop_rate)
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

