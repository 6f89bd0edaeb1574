"""Readers: every file type yields the same rows, with locations; bad files raise DataError."""

from __future__ import annotations

import pytest

from tunesmith.data import DataError
from tunesmith.data.readers import read_rows


ROWS = [
    {"instruction": "Add 2 and 3.", "input": "2, 3", "output": "5"},
    {"instruction": "Quote, please", "input": 'with "quotes", commas\nand a newline', "output": "ok"},
    {"instruction": "Unicode", "input": "héllo ☃", "output": "ünïcode"},
]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_every_reader_round_trips_the_same_rows(write, suffix):
    path = write(f"d.{suffix}", ROWS)
    rows = read_rows(path)
    assert [r.data for r in rows] == ROWS
    assert all(r.loc.startswith(path) for r in rows)


def test_locations_are_lines_or_rows(tmp_path, write):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')  # blank line ignored but counted
    assert [r.loc for r in read_rows(str(p))] == [f"{p}:1", f"{p}:3"]
    csv_path = write("d.csv", [{"text": "a"}, {"text": "b"}])
    assert [r.loc for r in read_rows(csv_path)] == [f"{csv_path}:2", f"{csv_path}:3"]
    pq_path = write("d.parquet", [{"text": "a"}, {"text": "b"}])
    assert [r.loc for r in read_rows(pq_path)] == [f"{pq_path}: row 1", f"{pq_path}: row 2"]


def test_json_data_wrapper_and_max_rows(write):
    path = write("d.json", {"data": ROWS})
    assert [r.data for r in read_rows(path)] == ROWS
    assert [r.data for r in read_rows(path, max_rows=2)] == ROWS[:2]


def test_malformed_jsonl_line(write):
    path = write("bad.jsonl", [ROWS[0], '{"instruction": "x", ', ROWS[1]])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON: "):
        read_rows(path)


def test_non_object_line(write):
    path = write("list.jsonl", [ROWS[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected an object .* found list"):
        read_rows(path)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty.{suffix}"
    path.write_text("\n" if suffix != "json" else "[]")
    with pytest.raises(DataError, match=rf"empty\.{suffix}: file has no rows"):
        read_rows(str(path))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match=r"not found: 'nope/missing\.jsonl'"):
        read_rows("nope/missing.jsonl")
    other = tmp_path / "d.tsv"
    other.write_text("hi")
    with pytest.raises(DataError, match=r"d\.tsv: unknown file type '\.tsv'.*\.jsonl"):
        read_rows(str(other))


def test_relative_path_resolves_against_cwd(tmp_path, write, monkeypatch):
    write("rel.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    assert len(read_rows("rel.jsonl")) == 3


def test_csv_empty_cell_is_null(write):
    path = write("e.csv", [{"instruction": "a", "input": "", "output": "b"}])
    assert read_rows(path)[0].data == {"instruction": "a", "input": None, "output": "b"}
