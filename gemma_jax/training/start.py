"""The model a run starts from (and writes back, trained, in the same format).

`init_from` names it: a gemma_jax checkpoint directory, "real:gemma3-270m" (the real Gemma 3 270M shipped
with the package), or a preset name for a random init. `resolve_start` reads only the metadata; the
parameters are read once, by `initial_params`, when the run needs them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gemma_jax import checkpoint as ckpt_lib
from gemma_jax.errors import ConfigError
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model import lora
from gemma_jax.model.params import flatten, init_adapters, init_params, param_shapes
from gemma_jax.model.sharding import ShardingContext
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.training.metrics import jsonable
from gemma_jax.training.run_config import LORA_FIELDS, model_overrides

REAL_PREFIX = "real:"


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
  """The saved model config with the run's compute dtype, master-weight dtype, remat policy and adapters."""
  adapters = config.lora
  return saved.replace(dtype=config.compute_dtype, param_dtype=config.param_dtype, remat=config.remat,
                       lora_rank=adapters.rank, lora_alpha=float(adapters.alpha), lora_rslora=adapters.rslora,
                       lora_targets=adapters.targets)


def check_tokenizer_fits(tokenizer: Tokenizer, model_config: TransformerConfig, where: str) -> None:
  """A tokenizer with ids past the embedding table would make every step non-finite (or read garbage rows)."""
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ConfigError(f"the tokenizer ({where}) has {tokenizer.vocab_size} pieces but the model's embedding has "
                      f"{model_config.vocab_size} rows, so ids >= {model_config.vocab_size} have none; use the "
                      "tokenizer the model was trained with (the checkpoint's own, the default)")


def check_adapters_match(start: Start, model_config: TransformerConfig, merge_alpha: float = 1.0) -> None:
  """A start that carries adapters trains on with the same ones (rank, alpha, targets), or is refused."""
  if not start.config.lora_rank:
    return
  if float(merge_alpha) != 1.0:  # (a, b) interpolated apart are not the model interpolated
    raise ConfigError(f"merge_alpha={merge_alpha}: init_from={start.path} carries adapters already; merge_alpha "
                      "applies to adapters trained from a base (or merge them first: python -m gemma_jax.convert "
                      "--src=ADAPTERS --dst=MERGED --merge)")
  saved = {f: getattr(start.config, f) for f in LORA_FIELDS}
  now = {f: getattr(model_config, f) for f in LORA_FIELDS}
  if saved != now:
    diffs = "; ".join(f"lora.{LORA_FIELDS[f]}: {saved[f]!r} saved, {now[f]!r} now" for f in saved
                      if saved[f] != now[f])
    raise ConfigError(f"init_from={start.path} carries adapters; train them on with the same settings ({diffs}), "
                      "or merge them into a full checkpoint first (python -m gemma_jax.convert --src=ADAPTERS "
                      "--dst=MERGED --merge)")


def initial_params(start: Start, model_config: TransformerConfig, ctx: ShardingContext, seed: int):
  """The starting parameters, placed by the sharding rules: the checkpoint's (read here), or a seeded init.
  With adapters (`lora_rank > 0`) not in the checkpoint, fresh ones (peft's init: the model is unchanged)."""
  if start.path is None:
    return init_params(model_config, jax.random.key(seed), ctx)
  ck = ckpt_lib.load(start.path, sharding=ctx, dtype=model_config.param_dtype)
  if model_config.lora_rank and not start.config.lora_rank:
    return lora.attach(ck.params, init_adapters(model_config, jax.random.key(seed), ctx))
  return ck.params


def toward_start(params, start: Start, model_config: TransformerConfig, ctx: ShardingContext, seed: int,
                 alpha: float):
  """`start + alpha * (params - start)` leaf by leaf, in the params' dtype and shardings (the starting
  parameters are read again: training may have donated their buffers). With adapters trained on a frozen base,
  exactly that by scaling the adapters' b (nothing is read)."""
  if model_config.lora_rank and not start.config.lora_rank:
    return jax.jit(lambda p: lora.scale_b(p, alpha))(params)
  initial = initial_params(start, model_config, ctx, seed)
  mix = lambda s, t: (s.astype(jnp.float32) + alpha * (t.astype(jnp.float32) - s.astype(jnp.float32))).astype(t.dtype)
  return jax.jit(lambda s, t: jax.tree.map(mix, s, t), donate_argnums=(0,))(initial, params)


def saved_model_config(start: Start, model_config: TransformerConfig) -> TransformerConfig:
  """The config a trained model is saved (and sampled) with: the start's, with the run's master-weight dtype and
  adapters (not the training-only compute dtype or remat)."""
  return start.config.replace(param_dtype=model_config.param_dtype,
                              **{f: getattr(model_config, f) for f in LORA_FIELDS})


def save_model(path: str, params, start: Start, model_config: TransformerConfig, config, *, step: int,
               metrics: dict[str, Any], skipped_steps: int = 0, examples: dict[str, int] | None = None,
               stop_rate: float | None = None) -> None:
  """Our checkpoint format: the saved config (not the training dtypes/remat), tokenizer and template.

  The provenance's "trained" records what training did: objective, steps, template, data sizes (`examples`)
  and, after an evaluation with greedy samples, `eval_stop_rate` (the fraction of them that ended with a stop
  token within `eval.sample_tokens`); the sampler warns when it is low.
  """
  saved_config = saved_model_config(start, model_config)
  base = None
  if model_config.lora_rank and start.path is not None:  # the adapters alone, naming their base
    base = (ckpt_lib.read_metadata(start.path).get("base") if start.config.lora_rank
            else ckpt_lib.base_reference(start.path))
    params = lora.split(params)[1]
  kind = "it" if start.template.is_chat else start.kind
  trained = {"from": config.init_from, "objective": config.objective, "steps": int(step),
             "skipped_steps": int(skipped_steps), "template": start.template.name,
             "chat_fine_tuned": bool(start.template.is_chat), **(examples or {})}
  if float(config.get("merge_alpha", 1.0)) != 1.0 and os.path.basename(path) == "final":
    trained["merge_alpha"] = float(config.merge_alpha)  # final/ is merged toward the start (best/ is not)
  if stop_rate is not None:
    trained.update(eval_stop_rate=float(stop_rate), eval_sample_tokens=int(config.eval.sample_tokens))
  extra = {"train_metrics": {k: jsonable(v) for k, v in metrics.items() if isinstance(v, (int, float))}}
  ckpt_lib.save(path, config=saved_config, params=params, tokenizer=start.tokenizer,
                template=start.template.to_dict(), kind=kind, provenance={"trained": trained}, extra=extra,
                base=base)
