"""Read rows from JSONL, JSON, CSV and parquet files, each tagged with its location."""

from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import DataError, type_name

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Row:
    """One source row: ``loc`` is ``FILE:LINE`` (JSONL, CSV) or ``FILE: row N`` (JSON, parquet)."""

    loc: str
    data: dict[str, Any]


def resolve_path(path: str, what: str = "data file") -> str:
    """Absolute path of ``path`` (relative to the current directory); DataError if missing."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise DataError(f"{what} not found: {path!r} (resolved to {full})")
    if not os.path.isfile(full):
        raise DataError(f"{what} {path!r} is not a file (expected one of {', '.join(SUFFIXES)})")
    return full


def read_rows(path: str, max_rows: int | None = None, what: str = "data file") -> list[Row]:
    """All rows of ``path`` (at most ``max_rows``); DataError on an unknown suffix or empty file."""
    full = resolve_path(path, what)
    suffix = os.path.splitext(full)[1].lower()
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unknown file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    rows = list(itertools.islice(readers[suffix](full, path), max_rows))
    if not rows:
        raise DataError(f"{path}: file has no rows")
    return rows


def _object(loc: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{loc}: expected an object with named fields, found {type_name(value)}")
    return value


def _jsonl(full: str, name: str) -> Iterator[Row]:
    with open(full, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            loc = f"{name}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{loc}: invalid JSON: {exc}") from None
            yield Row(loc, _object(loc, value))


def _json(full: str, name: str) -> Iterator[Row]:
    with open(full, encoding="utf-8") as fh:
        text = fh.read()
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}:{exc.lineno}: invalid JSON: {exc}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(
            f"{name}: expected a list of objects or {{\"data\": [...]}}, found {type_name(value)}"
        )
    for i, item in enumerate(value, start=1):
        loc = f"{name}: row {i}"
        yield Row(loc, _object(loc, item))


def _csv(full: str, name: str) -> Iterator[Row]:
    """Header row names the fields; every value is a str and an empty cell is null."""
    with open(full, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            # line_num is the physical line where this record ended (header is line 1).
            loc = f"{name}:{reader.line_num}"
            if None in row:
                raise DataError(f"{loc}: more values than header columns {reader.fieldnames}")
            yield Row(loc, {k: (None if v == "" else v) for k, v in row.items()})


def _parquet(full: str, name: str) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dev dependency
        raise DataError(f"{name}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(full)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{name}: cannot read parquet: {exc}") from None
    for i, item in enumerate(table.to_pylist(), start=1):
        yield Row(f"{name}: row {i}", item)
