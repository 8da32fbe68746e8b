"""Training: objectives (ORPO, SFT, DPO, SimPO) on chunked log-probs, and the training loop."""

from gemma_jax.training.dpo import dpo_loss, reference_logps
from gemma_jax.training.logprobs import LogProbs, model_logprobs, token_logprobs
from gemma_jax.training.orpo import orpo_loss
from gemma_jax.training.sft import sft_loss
from gemma_jax.training.simpo import simpo_loss
from gemma_jax.training.loop import Result, TrainingStopped, train
from gemma_jax.training.optim import make_optimizer, make_schedule
from gemma_jax.training.run_config import default_config
from gemma_jax.training.state import TrainState
from gemma_jax.training.step import jit_eval_step, jit_train_step
