"""Reading records: JSONL, JSON, Parquet, HF save_to_disk directories; locations and unreadable records."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gemma_jax.data.records import Invalid, Record, read_records
from gemma_jax.errors import DataError

HFREF_PYTHON = "/opt/hfref/bin/python"
ROWS = [{"prompt": "p1", "chosen": "c1", "rejected": "r1", "score": 1.5},
        {"prompt": "p2 café 東京", "chosen": "c2", "rejected": "r2", "score": 2.0}]


def read(path):
  out = list(read_records(path))
  return [(r.where, r.data) if isinstance(r, Record) else (r.where, "INVALID: " + r.message) for r in out]


def test_jsonl_locations_and_bad_lines(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\n" + b'{"prompt": "broken"\n' + b'{"prompt": "caf\xe9"}\n'
                + b"[1, 2]\n" + json.dumps(ROWS[1], ensure_ascii=False).encode() + b"\n"
                + b'{"prompt": "lone \\ud800 surrogate"}\n')
  got = read(p)
  assert got[0] == (f"{p}:1", ROWS[0])  # line 2 is blank: skipped
  assert got[1][0] == f"{p}:3" and "broken JSON" in got[1][1] and "column 20" in got[1][1]
  assert got[2] == (f"{p}:4", "INVALID: not valid UTF-8 (byte 0xe9 at column 16)")
  assert got[3] == (f"{p}:5", "INVALID: expected a JSON object, got a list")
  assert got[4] == (f"{p}:6", ROWS[1])
  assert got[5][0] == f"{p}:7" and "'prompt' is not valid UTF-8" in got[5][1]
  assert len(got) == 6


def test_json_array_line_numbers_and_bad_bytes(tmp_path):
  p = tmp_path / "d.json"
  body = json.dumps(ROWS, indent=2, ensure_ascii=False).encode()
  body = body.replace("p2 café".encode(), b"p2 caf\xe9")  # a Latin-1 byte inside the second record
  p.write_bytes(body)
  got = read(p)
  assert got[0] == (f"{p}:2", ROWS[0])
  assert got[1][0] == f"{p}:8" and "field 'prompt' is not valid UTF-8" in got[1][1]


def test_json_array_broken_midway_stops_with_line(tmp_path):
  p = tmp_path / "d.json"
  p.write_text('[\n {"a": 1},\n {"a": 2,,}\n]')
  with pytest.raises(DataError, match=rf"{p}:3: broken JSON"):
    read(p)


def test_json_that_is_json_lines(tmp_path):
  p = tmp_path / "d.json"  # what datasets' to_json writes
  p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
  assert read(p) == [(f"{p}:1", ROWS[0]), (f"{p}:2", ROWS[1])]


def test_byte_order_mark_and_single_object(tmp_path):
  for name, body in (("a.json", json.dumps(ROWS)), ("b.jsonl", json.dumps(ROWS[0]) + "\n"),
                     ("c.json", json.dumps(ROWS[0]) + "\n")):
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [r for _, r in read(p)] == (ROWS if name == "a.json" else ROWS[:1])
  p = tmp_path / "d.json"
  p.write_text(json.dumps({"version": 1, "data": ROWS}, indent=2))
  with pytest.raises(DataError, match="one JSON object .*under 'data'.*top-level JSON array"):
    read(p)


def test_parquet_rows(tmp_path):
  p = tmp_path / "d.parquet"
  pq.write_table(pa.Table.from_pylist(ROWS + [{"prompt": "p3", "chosen": None, "rejected": "r", "score": 0.0}]), p)
  got = read(p)
  assert got[:2] == [(f"{p}:1", ROWS[0]), (f"{p}:2", ROWS[1])]
  assert got[2] == (f"{p}:3", {"prompt": "p3", "chosen": None, "rejected": "r", "score": 0.0})


def test_arrow_directory_without_datasets(tmp_path):
  d = tmp_path / "ds"
  d.mkdir()
  table = pa.Table.from_pylist(ROWS)
  with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
    w.write_table(table)
  (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
  assert read(d) == [(f"{d}:1", ROWS[0]), (f"{d}:2", ROWS[1])]
  (tmp_path / "notds").mkdir()
  with pytest.raises(DataError, match="save_to_disk"):
    read(tmp_path / "notds")


def _has_datasets() -> bool:
  if not os.path.exists(HFREF_PYTHON):
    return False
  return subprocess.run([HFREF_PYTHON, "-c", "import datasets"], capture_output=True).returncode == 0


@pytest.mark.reference
@pytest.mark.skipif(not _has_datasets(), reason="needs HF datasets (the /opt/hfref reference venv)")
def test_hf_save_to_disk(tmp_path):
  script = ("import datasets, json, sys\n"
            "rows = json.loads(sys.argv[2])\n"
            "ds = datasets.Dataset.from_list(rows)\n"
            "ds.save_to_disk(sys.argv[1] + '/single')\n"
            "datasets.DatasetDict({'train_prefs': ds, 'test_prefs': ds.select([1])}).save_to_disk(sys.argv[1] + '/dd')\n")
  subprocess.run([HFREF_PYTHON, "-c", script, str(tmp_path), json.dumps(ROWS)], check=True, capture_output=True)
  assert [r for _, r in read(tmp_path / "single")] == ROWS
  with pytest.raises(DataError, match="DatasetDict with splits .*train_prefs"):
    read(tmp_path / "dd")
  assert [r for _, r in read(tmp_path / "dd" / "test_prefs")] == ROWS[1:]


def test_missing_and_unknown_files(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    read(tmp_path / "nope.jsonl")
  (tmp_path / "d.csv").write_text("a,b\n")
  with pytest.raises(DataError, match="unknown data format"):
    read(tmp_path / "d.csv")
  (tmp_path / "bad.parquet").write_bytes(b"not parquet")
  with pytest.raises(DataError, match="Parquet"):
    read(tmp_path / "bad.parquet")


def test_invalid_is_one_line():
  assert str(Invalid("f.jsonl:3", "missing field 'chosen'")) == "f.jsonl:3: missing field 'chosen'"


# -- hostile files: names that escape, malformed metadata, deep nesting -------------------------------------

def _arrow_dir(d, rows=ROWS, name="data-00000-of-00001.arrow"):
  d.mkdir(exist_ok=True)
  table = pa.Table.from_pylist(rows)
  with pa.OSFile(str(d / name), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
    w.write_table(table)
  return d


def test_state_json_data_files_stay_inside_the_directory(tmp_path):
  _arrow_dir(tmp_path / "outside")  # a readable dataset next door: it must not be read through ds/
  d = _arrow_dir(tmp_path / "ds")
  os.symlink(tmp_path / "outside" / "data-00000-of-00001.arrow", d / "link.arrow")
  for name, why in [("/etc/passwd", "is not a relative name inside"),
                    ("../outside/data-00000-of-00001.arrow", "leads outside"),
                    ("link.arrow", "leads outside")]:
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}]}))
    with pytest.raises(DataError) as e:
      read(d)
    assert str(e.value) == (f"{d}/state.json: _data_files[0].filename: {name!r} {why} {d}; refusing to follow it")


MALFORMED_STATE = [("[]", "malformed"), ('{"_data_files": "data.arrow"}', "malformed"),
                   ('{"_data_files": [{"name": "x"}]}', "malformed"),
                   ('{"_data_files": [{"filename": 3}]}', "expected a file name inside"),
                   ('{"_data_files": [{"filename": ""}]}', "expected a file name inside"),
                   ('{"_data_files": [', "not valid JSON"), ("[" * 100_000 + "]" * 100_000, "nested too deeply")]


def test_malformed_save_to_disk_metadata_is_one_line(tmp_path):
  d = _arrow_dir(tmp_path / "ds")
  for text, message in MALFORMED_STATE:
    (d / "state.json").write_text(text)
    with pytest.raises(DataError, match=message) as e:
      read(d)
    assert str(e.value).startswith(f"{d}/state.json: ") and "\n" not in str(e.value)
  (d / "state.json").unlink()
  (d / "state.json").mkdir()
  with pytest.raises(DataError, match="state.json: cannot read"):
    read(d)
  dd = tmp_path / "dd"
  dd.mkdir()
  for text, message in [('{"splits": "train"}', "malformed"), ("[1]", "malformed"),
                        ('{"splits": [1]}', "malformed"), ('{"splits": ["tr', "not valid JSON"),
                        ('{"a":' * 100_000 + "1" + "}" * 100_000, "too deeply")]:
    (dd / "dataset_dict.json").write_text(text)
    with pytest.raises(DataError, match=message) as e:
      read(dd)
    assert str(e.value).startswith(f"{dd}/dataset_dict.json: ") and "\n" not in str(e.value)


def test_deeply_nested_records(tmp_path):
  """100,000-deep JSON (json recurses per level) and 200-deep JSON (parseable) are per-record errors."""
  deep = "[" * 100_000 + "]" * 100_000
  medium = {"prompt": "p", "meta": json.loads("[" * 200 + "]" * 200)}
  p = tmp_path / "d.jsonl"
  p.write_text(f'{{"prompt": {deep}}}\n' + json.dumps(medium) + "\n" + json.dumps(ROWS[0]) + "\n")
  got = read(p)
  assert got[0] == (f"{p}:1", "INVALID: nested more than 100 levels deep; a record is a flat object of strings and "
                    "message lists")
  assert got[1] == (f"{p}:2", got[0][1]) and got[2] == (f"{p}:3", ROWS[0])
  q = tmp_path / "d.json"
  q.write_text(f'[\n{json.dumps(ROWS[0])},\n{{"prompt": {deep}}}\n]')
  with pytest.raises(DataError, match=rf"{q}:3: a record nested more than 100 levels deep; the rest of the file"):
    read(q)
  r = tmp_path / "e.json"  # JSON Lines in a .json file, its first line too deep
  r.write_text(f'{{"prompt": {deep}}}\n' + json.dumps(ROWS[0]) + "\n")
  assert [w for w, _ in read(r)] == [f"{r}:1", f"{r}:2"]
