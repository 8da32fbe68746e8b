"""Raw records from JSONL, JSON, Parquet files and HF `datasets` saved to disk, with per-record locations.

Every record gets `where = "FILE:N"`: N is the line for JSON Lines and JSON arrays, the 1-based row for Parquet
and Arrow (HF `save_to_disk`) data. A record that cannot be read (broken JSON, bytes that are not UTF-8, a
row that is not an object) becomes an `Invalid` with one line of explanation; reading goes on. Only problems
that stop the whole file (missing, unknown format, a JSON array broken mid-way) raise `DataError`.

Formats: `.jsonl` / `.ndjson` JSON Lines; `.json` is a JSON array of objects, or JSON Lines when it starts with
`{` (what `datasets.Dataset.to_json` writes); `.parquet`; a directory written by `Dataset.save_to_disk` (read
with pyarrow, `datasets` is not needed). A `DatasetDict` directory names its splits: pass `DIR/<split>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from gemma_jax.errors import DataError, UserError
from gemma_jax.paths import inside

# Records are flat (fields of strings and message lists); anything deeper is refused before code that recurses
# (or pickles records for worker processes) meets it.
MAX_DEPTH = 100


@dataclasses.dataclass(frozen=True)
class Record:
  where: str  # "FILE:N"
  data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Invalid:
  where: str
  message: str

  def __str__(self) -> str:
    return f"{self.where}: {self.message}"


def read_records(path: str | os.PathLike) -> Iterator[Record | Invalid]:
  """Yields each record of `path` (a `Record`, or an `Invalid` when it cannot be read) in file order."""
  path = os.fspath(path)
  if os.path.isdir(path):
    yield from _read_arrow_dir(path)
    return
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file")
  lower = path.lower()
  if lower.endswith((".jsonl", ".ndjson")):
    yield from _read_jsonl(path)
  elif lower.endswith(".json"):
    with open(path, "rb") as f:
      head = f.read(4096).removeprefix(BOM).lstrip()
    if head.startswith(b"["):
      yield from _read_json_array(path)
    else:
      _refuse_single_object(path)
      yield from _read_jsonl(path)
  elif lower.endswith(".parquet"):
    yield from _read_parquet(path)
  else:
    raise DataError(f"{path}: unknown data format; use .jsonl, .json, .parquet or a `save_to_disk` directory")


BOM = b"\xef\xbb\xbf"


def _refuse_single_object(path: str) -> None:
  """A pretty-printed JSON object (e.g. {"data": [...]}) is neither an array of records nor JSON Lines."""
  with open(path, "rb") as f:
    raw = f.read().removeprefix(BOM)
  lines = [line for line in raw.splitlines() if line.strip()]
  if len(lines) < 2:
    return
  try:
    json.loads(lines[0])
    return
  except RecursionError:
    return  # a JSON Lines file whose first record is too deep: reported line by line
  except ValueError:
    pass
  try:
    obj = json.loads(raw)
  except (ValueError, RecursionError):
    return  # broken JSON Lines: reported line by line
  if isinstance(obj, dict):
    keys = [k for k, v in obj.items() if isinstance(v, list)]
    hint = f" (its records seem to be under {keys[0]!r})" if len(keys) == 1 else ""
    raise DataError(f"{path}: one JSON object{hint}; give records as a top-level JSON array or as JSON Lines "
                    "(one object per line)")


TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep; a record is a flat object of strings and message lists"


def _check_object(obj: Any, where: str) -> Record | Invalid:
  if not isinstance(obj, dict):
    return Invalid(where, f"expected a JSON object, got {_type_name(obj)}")
  bad = _find_bad_text(obj)
  if bad is _DEEP:
    return Invalid(where, TOO_DEEP)
  if bad is not None:
    return Invalid(where, f"field {bad!r} is not valid UTF-8 text (invalid bytes or a lone surrogate)")
  return Record(where, obj)


def _read_jsonl(path: str) -> Iterator[Record | Invalid]:
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      where = f"{path}:{n}"
      if n == 1:
        raw = raw.removeprefix(BOM)
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        yield Invalid(where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
        continue
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        yield Invalid(where, f"broken JSON: {e.msg} at column {e.colno}")
        continue
      except RecursionError:  # json recurses once per nesting level
        yield Invalid(where, TOO_DEEP)
        continue
      yield _check_object(obj, where)


def _read_json_array(path: str) -> Iterator[Record | Invalid]:
  with open(path, "rb") as f:
    raw = f.read()
  # Undecodable bytes become lone surrogates; the record holding them is reported, the others are read.
  text = raw.removeprefix(BOM).decode("utf-8", errors="surrogateescape")
  decoder = json.JSONDecoder()
  i = text.index("[") + 1
  n = len(text)

  def line_of(pos: int) -> int:
    return text.count("\n", 0, pos) + 1

  def skip_ws(pos: int) -> int:
    while pos < n and text[pos] in " \t\r\n":
      pos += 1
    return pos

  i = skip_ws(i)
  if i < n and text[i] == "]":
    return
  while True:
    i = skip_ws(i)
    start_line = line_of(i)
    try:
      obj, i = decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}: broken JSON: {e.msg} at column {e.colno}; the rest of the file cannot "
                      "be read (JSON Lines files can skip a broken line)") from None
    except RecursionError:
      raise DataError(f"{path}:{start_line}: a record nested more than {MAX_DEPTH} levels deep; the rest of the file "
                      "cannot be read (JSON Lines files can skip a bad line)") from None
    yield _check_object(obj, f"{path}:{start_line}")
    i = skip_ws(i)
    if i < n and text[i] == ",":
      i += 1
      continue
    if i < n and text[i] == "]":
      if skip_ws(i + 1) != n:
        raise DataError(f"{path}:{line_of(i + 1)}: broken JSON: extra data after the closing ']'")
      return
    raise DataError(f"{path}:{line_of(i)}: broken JSON: expected ',' or ']' between records")


def _read_parquet(path: str) -> Iterator[Record | Invalid]:
  import pyarrow.parquet as pq
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError with a clear message
    raise DataError(f"{path}: cannot read as Parquet: {e}") from None
  n = 0
  for batch in pf.iter_batches(batch_size=4096):
    for row in batch.to_pylist():
      n += 1
      yield _check_object(row, f"{path}:{n}")


def _read_arrow_dir(path: str) -> Iterator[Record | Invalid]:
  import pyarrow as pa
  resave = "re-save it with `datasets` save_to_disk"
  dict_file = os.path.join(path, "dataset_dict.json")
  if os.path.exists(dict_file):
    d = _load_json(dict_file)
    splits = d.get("splits") if isinstance(d, dict) else None
    if not isinstance(splits, list) or not all(isinstance(x, str) for x in splits):
      raise DataError(f'{dict_file}: malformed (expected {{"splits": [names of splits]}}); {resave}')
    raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; pass one split, e.g. "
                    f"{os.path.join(path, splits[0] if splits else 'train')}")
  state_file = os.path.join(path, "state.json")
  if not os.path.exists(state_file):
    raise DataError(f"{path}: a directory, but not one written by `datasets.Dataset.save_to_disk` (no state.json)")
  state = _load_json(state_file)
  entries = state.get("_data_files") if isinstance(state, dict) else None
  if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
    raise DataError(f'{state_file}: malformed (expected "_data_files": [{{"filename": ...}}, ...]); {resave}')
  if not entries:
    raise DataError(f"{state_file}: lists no data files")
  try:  # a data file is only read inside the dataset's directory
    files = [inside(path, e["filename"], f"{state_file}: _data_files[{i}].filename") for i, e in enumerate(entries)]
  except UserError as e:
    raise DataError(str(e)) from None
  n = 0
  for file in files:
    try:
      with pa.memory_map(file) as source:
        try:
          table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
          table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
      raise DataError(f"{file}: cannot read as Arrow: {e}") from None
    for batch in table.to_batches(max_chunksize=4096):
      for row in batch.to_pylist():
        n += 1
        yield _check_object(row, f"{path}:{n}")


def _load_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  except RecursionError:
    raise DataError(f"{path}: JSON nested too deeply to read; re-save the dataset with `datasets` "
                    "save_to_disk") from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise DataError(f"{path}: not valid JSON ({e}); re-save the dataset with `datasets` save_to_disk") from None


_DEEP = "<too deep>"  # what _find_bad_text returns for a record nested deeper than MAX_DEPTH


def _find_bad_text(obj: Any) -> str | None:
  """The first field (dotted path) holding text that cannot be encoded as UTF-8, `_DEEP`, or None.

  Iterative: a record nested deeper than the interpreter's recursion limit must not crash the reader.
  """
  stack = [(obj, "", 0)]
  while stack:
    x, field, depth = stack.pop()
    if depth > MAX_DEPTH:
      return _DEEP
    if isinstance(x, str):
      try:
        x.encode("utf-8")
      except UnicodeEncodeError:
        return field or "<record>"
    elif isinstance(x, dict):
      items = []
      for k, v in x.items():
        if isinstance(k, str):
          items.append((k, field, depth + 1))
        items.append((v, f"{field}.{k}" if field else str(k), depth + 1))
      stack.extend(reversed(items))  # depth first, in order: the first bad field is reported
    elif isinstance(x, list):
      stack.extend(reversed([(v, f"{field}[{i}]", depth + 1) for i, v in enumerate(x)]))
  return None


def _type_name(v: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
          bool: "a boolean", type(None): "null"}.get(type(v), type(v).__name__)


# -- conversation fields ---------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "model")


def as_messages(value: Any, field: str, *, default_role: str) -> list[dict[str, str]]:
  """A field given as a string (one message of `default_role`) or a list of {role, content} messages.

  Raises DataError (without location; the caller adds it) for wrong types, unknown roles, empty content.
  Roles are normalized (`model` -> `assistant`); other keys of a message are dropped.
  """
  was_string = isinstance(value, str)
  if was_string:
    value = [{"role": default_role, "content": value}]
  elif not isinstance(value, list):
    raise DataError(f"field {field!r} must be a string or a list of messages, got {_type_name(value)}")
  if not value:
    raise DataError(f"field {field!r} is empty")
  out = []
  for i, m in enumerate(value):
    name = f"{field}[{i}]"
    if not isinstance(m, dict):
      raise DataError(f"{name} must be an object with 'role' and 'content', got {_type_name(m)}")
    if "role" not in m or "content" not in m:
      missing = "role" if "role" not in m else "content"
      raise DataError(f"{name} has no {missing!r}")
    role, content = m["role"], m["content"]
    if role not in ROLES:
      raise DataError(f"{name}.role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
      raise DataError(f"{name}.content must be a string, got {_type_name(content)}")
    if not content.strip():
      raise DataError(f"field {field!r} is empty" if was_string else f"{name}.content is empty")
    out.append({"role": "assistant" if role == "model" else role, "content": content})
  return out


def check_alternation(messages: list[dict[str, str]], field: str) -> None:
  """After an optional leading system message, roles go user, assistant, user, ... (DataError otherwise)."""
  expect = "user"
  for i, m in enumerate(messages):
    if m["role"] == "system":
      if i != 0:
        raise DataError(f"{field}[{i}]: a system message may only come first")
      continue
    if m["role"] != expect:
      prev = messages[i - 1]["role"] if i else "the start"
      raise DataError(f"{field}: roles do not alternate: message {i} is {m['role']!r} after {prev!r}")
    expect = "assistant" if expect == "user" else "user"


def require(d: dict[str, Any], field: str) -> Any:
  if field not in d or d[field] is None:
    raise DataError(f"missing field {field!r}")
  return d[field]
