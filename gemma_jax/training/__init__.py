"""Training: objectives (ORPO, SFT, DPO, SimPO) on chunked log-probs, and the training loop."""

from gemma_jax.training.dpo import dpo_loss, reference_logps
from gemma_jax.training.logprobs import LogProbs, model_logprobs, token_logprobs
from gemma_jax.training.orpo import orpo_loss
from gemma_jax.training.sft import sft_loss
from gemma_jax.training.simpo import simpo_loss
