"""A CPU matmul for weights stored in panels, for decoding (see packed_matmul.cc).

At decode, each step multiplies a few rows (the batch) by every weight of the model, so the step is bound by
reading the weights. XLA's CPU GEMM reads such shapes at about half the memory bandwidth at batch 8; this
kernel reads a weight stored as 32-column panels ([K, N] -> [N / 32, K, 32], each panel contiguous; the last
N % 32 columns after them as [K, N % 32]) front to back at close to the bandwidth (measured in BENCHMARKS.md).

A packed weight keeps its logical shape: `pack(eqn, w)` returns an array of `w`'s shape whose memory holds the
panels, so a params tree keeps its structure and shapes (Flax checks them). Only `einsum(eqn, x, w_packed)`
reads it. f32 only; `available()` says whether the kernel could be built here (it is compiled once, on first
use, with the system's C++ compiler for this CPU, and cached under `$GEMMA_JAX_CACHE/kernels`;
`GEMMA_JAX_PACKED_MATMUL=0` switches it off everywhere).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from absl import logging

from gemma_jax.paths import cache_dir

PANEL = 32
_SOURCE = os.path.join(os.path.dirname(__file__), "packed_matmul.cc")
_TARGET = "gemma_jax_packed_matmul"


def _compile(out_path: str) -> None:
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(out_path)) as tmp:
    tmp_out = os.path.join(tmp, "lib.so")
    cmd = [cxx, "-std=gnu++17", "-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp_out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
      raise RuntimeError(f"building {os.path.basename(_SOURCE)} with {cxx} failed: {why}")
    os.replace(tmp_out, out_path)  # atomic: concurrent builders never load a half-written file


def _cpu_flags() -> bytes:
  """The CPU's feature flags (Linux): a cache shared by machines with other CPUs never loads code built for
  features this one lacks (-march=native)."""
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
  except OSError:
    return b""


def _library_path() -> str:
  with open(_SOURCE, "rb") as f:
    key = hashlib.sha256(f.read() + jax.__version__.encode() + os.uname().machine.encode()
                         + _cpu_flags()).hexdigest()[:16]
  return os.path.join(cache_dir(), "kernels", f"packed_matmul-{key}.so")


@functools.cache
def available() -> bool:
  """True when the kernel is built and registered with XLA (CPU backend only; built on first call)."""
  if jax.default_backend() != "cpu" or os.environ.get("GEMMA_JAX_PACKED_MATMUL", "1") == "0":
    return False
  path = _library_path()
  try:
    if not os.path.exists(path):
      _compile(path)
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.GemmaPackedMatmul), platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    logging.warning("packed CPU matmul unavailable (%s); decoding uses XLA's matmul, slower at batch > 1", e)
    return False
  return True


def _split(eqn: str) -> tuple[str, str, str, str, str]:
  """'BTD,NDH->BTNH' -> (x letters, w letters, out letters, contracted (in x's order), w's kept letters)."""
  lhs, out = eqn.replace(" ", "").split("->")
  x, w = lhs.split(",")
  contracted = "".join(c for c in x if c in w and c not in out)
  kept = "".join(c for c in w if c not in contracted)
  batch = "".join(c for c in x if c not in contracted)
  if sorted(out) != sorted(batch + kept):
    raise ValueError(f"{eqn}: not a plain matmul of x by w")
  return x, w, out, contracted, kept


def _matrix_shape(eqn: str, shape: tuple[int, ...]) -> tuple[int, int]:
  _, w, _, contracted, kept = _split(eqn)
  dims = dict(zip(w, shape))
  k = n = 1
  for c in contracted:
    k *= dims[c]
  for c in kept:
    n *= dims[c]
  return k, n


def pack(eqn: str, w: jax.Array) -> jax.Array:
  """The weight of `eqn` (e.g. 'BTD,NDH->BTNH') in panels, with `w`'s shape. Inverse: `unpack`."""
  _, letters, _, contracted, kept = _split(eqn)
  k, n = _matrix_shape(eqn, w.shape)
  matrix = jnp.transpose(w, [letters.index(c) for c in contracted + kept]).reshape(k, n)
  full = n - n % PANEL
  panels = matrix[:, :full].reshape(k, full // PANEL, PANEL).transpose(1, 0, 2)
  return jnp.concatenate([panels.reshape(-1), matrix[:, full:].reshape(-1)]).reshape(w.shape)


def unpack(eqn: str, packed: jax.Array) -> jax.Array:
  _, letters, _, contracted, kept = _split(eqn)
  k, n = _matrix_shape(eqn, packed.shape)
  dims = dict(zip(letters, packed.shape))
  full = n - n % PANEL
  flat = packed.reshape(-1)
  panels = flat[:k * full].reshape(full // PANEL, k, PANEL).transpose(1, 0, 2).reshape(k, full)
  matrix = jnp.concatenate([panels, flat[k * full:].reshape(k, n - full)], axis=1)
  order = contracted + kept
  matrix = matrix.reshape([dims[c] for c in order])
  return jnp.transpose(matrix, [order.index(c) for c in letters])


def matmul(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
  """x [M, K] f32 @ the [K, n] weight held by `panels` (flat, as `pack` lays it out) -> [M, n] f32."""
  if not available():
    raise RuntimeError("the packed matmul kernel is unavailable here (CPU only; the log says why)")
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, panels.reshape(-1))


def einsum(eqn: str, x: jax.Array, packed: jax.Array) -> jax.Array:
  """`jnp.einsum(eqn, x, w)` for `packed = pack(eqn, w)`, through the kernel (f32)."""
  xl, wl, out, contracted, kept = _split(eqn)
  batch = "".join(c for c in xl if c not in contracted)
  k, n = _matrix_shape(eqn, packed.shape)
  x2 = jnp.transpose(x.astype(jnp.float32), [xl.index(c) for c in batch + contracted]).reshape(-1, k)
  y = matmul(x2, packed, n)
  sizes = dict(zip(xl, x.shape)) | dict(zip(wl, packed.shape))
  y = y.reshape([sizes[c] for c in batch + kept])
  return jnp.transpose(y, [(batch + kept).index(c) for c in out])


def take_columns(eqn: str, packed: jax.Array, index: jax.Array) -> jax.Array:
  """Columns `index` [...] of the weight's [K, N] matrix, from its packed form -> [..., K] (one gather).

  For the tied head (eqn 'BTD,VD->BTV'), column v is row v of the [V, D] table: the token embedding.
  """
  k, n = _matrix_shape(eqn, packed.shape)
  full = n - n % PANEL
  in_panel = index < full
  base = jnp.where(in_panel, index // PANEL * (k * PANEL) + index % PANEL, k * full + index - full)
  stride = jnp.where(in_panel, PANEL, n - full)
  return packed.reshape(-1)[base[..., None] + jnp.arange(k) * stride[..., None]]
