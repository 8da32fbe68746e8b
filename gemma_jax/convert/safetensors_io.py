"""safetensors files without torch: lazy reading (any dtype, bf16 included, via the header) and streaming writing.

    SafetensorsFile(path).shapes() / .get(name) -> np.ndarray       read one tensor at a time
    write_safetensors(path, specs, tensors)                          header from specs, bytes tensor by tensor

A file is 8 bytes (little-endian header length n), n bytes of JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {...}}, then the raw tensor bytes in C order.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

from gemma_jax.errors import CheckpointError

# safetensors dtype codes <-> numpy.
ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
              "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
              "BOOL": np.dtype(np.bool_)}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}


class SafetensorsFile:
  """One safetensors file read lazily: the header up front, each tensor on request.

  `safe_open` validates the file; tensors are read at their header offsets with numpy, because safetensors'
  numpy framework cannot return bf16 (ml_dtypes provides the dtype).
  """

  def __init__(self, path: str):
    self.path = path
    try:
      try:
        with safe_open(path, framework="numpy"):
          pass
      except Exception as e:  # SafetensorError has no importable base class across versions
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise ValueError("file shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 1024 ** 2):
          raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
      self.base = 8 + n
      header.pop("__metadata__", None)
      self.entries = {}
      end_max = 0
      for name, e in header.items():
        if e["dtype"] not in ST_DTYPES:
          raise ValueError(f"tensor {name} has unsupported dtype {e['dtype']}")
        dt = ST_DTYPES[e["dtype"]]
        shape = tuple(int(x) for x in e["shape"])
        start, end = (int(x) for x in e["data_offsets"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
          raise ValueError(f"tensor {name}: data_offsets do not match its shape and dtype")
        end_max = max(end_max, end)
        self.entries[name] = (dt, shape, start)
      if self.base + end_max > size:
        raise ValueError(f"truncated: header describes {self.base + end_max} bytes, file has {size}")
    except RecursionError:  # a header nested deeper than json can parse
      raise CheckpointError(f"{path}: not a valid safetensors file (header nested too deeply); re-download or "
                            "re-export it") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
      msg = getattr(e, "strerror", None) or str(e)
      raise CheckpointError(f"{path}: not a valid safetensors file ({msg}); re-download or re-export it") from None

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {n: s for n, (_, s, _) in self.entries.items()}

  def get(self, name: str) -> np.ndarray:
    dt, shape, start = self.entries[name]
    count = int(np.prod(shape, dtype=np.int64))
    with open(self.path, "rb") as f:
      f.seek(self.base + start)
      a = np.fromfile(f, dtype=dt, count=count)
    if a.size != count:
      raise CheckpointError(f"{self.path}: truncated while reading tensor {name}; re-download or re-export it")
    return a.reshape(shape)


def write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                       tensors: Iterator[tuple[str, np.ndarray]]) -> None:
  """Writes tensors in `specs` order, streaming (the header comes from the specs, the bytes one by one)."""
  header, offset = {}, 0
  for name, shape, dt in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    header[name] = {"dtype": ST_CODES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dt in specs:
      got_name, t = next(tensors)
      assert got_name == name and t.shape == tuple(shape) and t.dtype == dt, (got_name, name, t.shape, shape)
      f.write(np.ascontiguousarray(t).view(np.uint8).data)
