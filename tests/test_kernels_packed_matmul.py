"""The packed CPU matmul: panels round-trip bitwise, the kernel equals XLA's einsum for every shape the model
uses (row blocks and their remainders, column tails, the threaded path), and a packed model equals the plain
one (through `PackedMatmul`, the hook the sampler's packed layout passes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from gemma_jax.kernels import packed_matmul
from gemma_jax.model import Transformer, init_params
from gemma_jax.sampling.weight_layout import PACKED, WEIGHT_EQNS, pack_params

needs_kernel = pytest.mark.skipif(not packed_matmul.available(), reason="no C++ compiler: packed kernel not built")

# (eqn, x shape, w shape): the model's einsums, with N % 32 != 0 tails and K not a multiple of 16
CASES = [("BTD,NDH->BTNH", (3, 5, 40), (4, 40, 24)), ("BTD,CKDH->CBTKH", (2, 1, 40), (2, 1, 40, 16)),
         ("BTD,CNDH->CBTNH", (1, 9, 40), (3, 2, 40, 16)), ("BTNH,NHD->BTD", (2, 3, 4, 16), (4, 16, 72)),
         ("BTD,CFD->CBTF", (17, 1, 40), (2, 48, 40)), ("BTF,FD->BTD", (8, 1, 96), (96, 40)),
         ("BTD,VD->BTV", (2, 3, 40), (1000, 40))]


@needs_kernel
@pytest.mark.parametrize("eqn,xs,ws", CASES)
def test_packed_einsum_equals_xla(eqn, xs, ws):
  x = jax.random.normal(jax.random.key(0), xs)
  w = jax.random.normal(jax.random.key(1), ws)
  packed = packed_matmul.pack(eqn, w)
  assert packed.shape == w.shape and not np.array_equal(np.asarray(packed), np.asarray(w))
  np.testing.assert_array_equal(np.asarray(packed_matmul.unpack(eqn, packed)), np.asarray(w))
  got = jax.jit(packed_matmul.einsum, static_argnums=0)(eqn, x, packed)
  want = jnp.einsum(eqn, x, w, precision="highest")
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 8, 13, 64])
def test_every_row_count_and_the_threaded_path(m):
  """Rows in blocks of 8 (4 without AVX-512) plus remainders; a 2.6 MB weight is split over the threads."""
  k, n = 640, 1030
  x = jax.random.normal(jax.random.key(2), (m, k))
  w = jax.random.normal(jax.random.key(3), (k, n))
  got = jax.jit(lambda x, p: packed_matmul.matmul(x, p, n))(x, packed_matmul.pack("MK,KN->MN", w))
  np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.dot(x, w, precision="highest")), rtol=1e-4,
                             atol=1e-4)


def test_take_columns_gives_embedding_rows():
  table = jax.random.normal(jax.random.key(4), (1000, 40))  # 31 panels + a tail of 8 rows
  packed = packed_matmul.pack("BTD,VD->BTV", table)
  ids = jnp.array([[0, 31, 32, 991, 992, 999], [5, 500, 998, 1, 2, 3]])
  np.testing.assert_array_equal(np.asarray(packed_matmul.take_columns("BTD,VD->BTV", packed, ids)),
                                 np.asarray(table[ids]))


@needs_kernel
@pytest.mark.parametrize("family,kv_heads", [("gemma2", 2), ("gemma3", 4)])
def test_packed_model_equals_the_plain_model(family, kv_heads):
  """Every weight packed (gemma3 with as many kv heads as heads: the fused qkv projection) -> the same logits."""
  cfg = tiny_config(family, num_kv_heads=kv_heads, vocab_size=300)
  params = init_params(cfg, jax.random.key(5))
  tokens = jax.random.randint(jax.random.key(6), (2, 11), 0, 300)
  want = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])(params, tokens)
  packed = pack_params(params)
  got = jax.jit(lambda p, t: Transformer(cfg, matmul=PACKED).apply({"params": p}, t)[0])(packed, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)
  names = {getattr(k, "key", None) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] for k in path}
  assert ("qkv_einsum" in names) == (kv_heads == 4) and {"input_embedding", "linear"} <= names & set(WEIGHT_EQNS)


def test_a_failed_build_is_one_clear_error(monkeypatch, tmp_path):
  """A compiler that fails (runs everywhere: the build is pointed at a broken one): one RuntimeError naming the
  compiler's last line, no library left behind, and `available()` says False (here, with the kernel cache in
  `tmp_path`, so nothing is loaded) instead of raising."""
  broken = tmp_path / "broken-c++"
  broken.write_text("#!/bin/sh\necho 'some warning' >&2\necho 'fatal error: broken on purpose' >&2\nexit 3\n")
  broken.chmod(0o755)
  monkeypatch.setenv("CXX", str(broken))
  with pytest.raises(RuntimeError, match=r"with .*broken-c\+\+ failed: fatal error: broken on purpose$"):
    packed_matmul._compile(str(tmp_path / "lib.so"))
  assert not (tmp_path / "lib.so").exists()
  monkeypatch.setenv("CXX", "/bin/false")  # no message at all: the exit code
  with pytest.raises(RuntimeError, match="failed: exit code 1$"):
    packed_matmul._compile(str(tmp_path / "lib.so"))
  monkeypatch.setenv("GEMMA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("GEMMA_JAX_PACKED_MATMUL", "1")
  assert packed_matmul.available.__wrapped__() is False  # uncached: the real `available()` is untouched
  assert not list((tmp_path / "cache").rglob("*.so"))
