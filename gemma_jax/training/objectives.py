"""The objectives table: one row per `config.objective`, everything the loop and the config checks need.

    name    loss         data        reference model   hyper-parameters (config.loss)          reads
    orpo    orpo_loss    preference  no                orpo_lambda (as beta), nll_target        responses*
    sft     sft_loss     sft         no                -                                        targets
    dpo     dpo_loss     preference  yes (frozen)      beta, label_smoothing                    responses
    simpo   simpo_loss   preference  no                beta, gamma, label_smoothing             responses

"reads": the tokens whose log-probs the loss uses (*: with nll_target="sequence", every chosen token too). A
loss that reads only target tokens runs the output head on at most `max_targets` positions per row.

Preference data has R = 2B rows per batch of B pairs (chosen, then rejected); SFT data R = B rows. A loss
that needs a reference model reads the frozen starting parameters as the step's `aux`; with adapters (LoRA)
the reference is the base with the adapters switched off (b = 0), so no second copy of the weights exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

from gemma_jax.errors import ConfigError
from gemma_jax.model import lora
from gemma_jax.training.dpo import dpo_loss
from gemma_jax.training.orpo import orpo_loss
from gemma_jax.training.sft import sft_loss
from gemma_jax.training.simpo import simpo_loss

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  loss: Callable[..., tuple[Any, dict[str, Any]]]  # (params, batch, *, model, config, ...) -> (loss, metrics)
  data_kind: str  # "preference" or "sft"
  needs_reference: bool  # the loss reads frozen reference params (`reference_params=aux`)
  hyper: Callable[[ml_collections.ConfigDict], dict[str, Any]]  # its keyword arguments from config.loss
  metrics: tuple[str, ...]  # the metric names the loss returns (besides the loss)
  reads_only_targets: Callable[[ml_collections.ConfigDict], bool]  # from config.loss: see the table's "reads"

  @property
  def rows_per_example(self) -> int:
    """Batch rows per example: 2 for a preference pair (chosen, rejected), 1 for an SFT sequence."""
    return 2 if self.data_kind == "preference" else 1


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("orpo", orpo_loss, "preference", False,
              lambda c: {"beta": c.orpo_lambda, "nll_target": c.nll_target},
              REWARDS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"), lambda c: c.nll_target == "response"),
    Objective("sft", sft_loss, "sft", False, lambda c: {}, ("nll_loss", "target_tokens"), lambda c: True),
    Objective("dpo", dpo_loss, "preference", True,
              lambda c: {"beta": c.beta, "label_smoothing": c.label_smoothing}, REWARDS, lambda c: True),
    Objective("simpo", simpo_loss, "preference", False,
              lambda c: {"beta": c.beta, "gamma": c.gamma, "label_smoothing": c.label_smoothing}, REWARDS,
              lambda c: True),
)}
NAMES = tuple(OBJECTIVES)


def get(name: str) -> Objective:
  """The table row of `name` (ConfigError naming the choices otherwise)."""
  if name not in OBJECTIVES:
    raise ConfigError(f"objective={name!r}: use one of {', '.join(OBJECTIVES)}")
  return OBJECTIVES[name]


def make_loss_fn(config: ml_collections.ConfigDict, model, model_config, max_targets: int | None = None):
  """`loss_fn(params, batch, aux) -> (loss, metrics)` for the configured objective (aux: reference params).

  max_targets: the most target tokens of any row the loss will see (`RunData.max_targets`); the output head
  then runs on that many positions per row when the objective reads only target tokens. None: every position.
  """
  objective = get(config.objective)
  c = config.loss
  kwargs = {"model": model, "config": model_config, **objective.hyper(c), "chunk_size": c.chunk_size or None,
            "max_saved_bytes": c.saved_logits_mib << 20}
  if max_targets is not None and objective.reads_only_targets(c):
    kwargs["max_targets"] = max_targets
  loss = objective.loss
  if objective.needs_reference and model_config.lora_rank:  # the reference: the base, adapters switched off
    off = lambda p: lora.scale_b(jax.lax.stop_gradient(p), 0.0)
    return lambda p, b, aux: loss(p, b, reference_params=off(p), **kwargs)
  if objective.needs_reference:
    return lambda p, b, aux: loss(p, b, reference_params=aux, **kwargs)
  return lambda p, b, aux: loss(p, b, **kwargs)
