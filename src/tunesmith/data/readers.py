"""Read rows from JSONL, JSON, CSV, parquet and plain-text files, each tagged with its location.

A row that cannot be read (bytes that are not UTF-8, a line that is not JSON or not an object)
carries an ``error`` naming its place: with ``on_error="raise"`` the reader raises it, with
``"skip"`` the row is passed on for the caller to drop and count.

Plain text (``.txt``, or a directory of ``.txt`` files) gives ``{"text": ...}`` rows: one document per
file, or one per block of lines between blank lines (``txt_documents``).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import DataError, type_name

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, as errors="surrogateescape" keeps them


@dataclass
class Row:
    """One source row: ``loc`` is ``FILE:LINE`` (JSONL, CSV, text) or ``FILE: row N`` (JSON, parquet);
    ``error`` says why it could not be read (then ``data`` is empty)."""

    loc: str
    data: dict[str, Any]
    error: str | None = None


def resolve_path(path: str, what: str = "data file", dirs: bool = False) -> str:
    """Absolute path of ``path`` (relative to the current directory); DataError if missing."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise DataError(f"{what} not found: {path!r} (resolved to {full})")
    if not os.path.isfile(full) and not (dirs and os.path.isdir(full)):
        raise DataError(f"{what} {path!r} is not a file (expected one of {', '.join(SUFFIXES)}, "
                        "or a directory of .txt files)")
    return full


def read_rows(path: str, max_rows: int | None = None, what: str = "data file", *, on_error: str = "raise",
              txt_documents: str = "file", source: dict | None = None) -> list[Row]:
    """All rows of ``path`` (at most ``max_rows``); DataError on an unknown suffix or an empty file, and
    on the first unreadable row when ``on_error`` is raise."""
    out = list(iter_rows(path, max_rows, what, on_error=on_error, txt_documents=txt_documents, source=source))
    if not out:
        raise DataError(f"{path}: file has no rows")
    return out


def iter_rows(path: str, max_rows: int | None = None, what: str = "data file", *, on_error: str = "raise",
              txt_documents: str = "file", source: dict | None = None) -> Iterator[Row]:
    """The rows of ``path`` one at a time (read_rows without holding them; an empty file yields none).
    A datasets name or folder (data/hub.py) is read through the datasets library with ``source``'s split,
    subset and streaming."""
    from .hub import datasets_rows, is_datasets_source
    if is_datasets_source(path):
        rows = datasets_rows(path, **(source or {}))
    elif os.path.isdir(full := resolve_path(path, what, dirs=True)):
        rows = itertools.chain.from_iterable(_txt(f, os.path.join(path, os.path.relpath(f, full)), txt_documents)
                                             for f in _txt_files(full, path))
    else:
        suffix = os.path.splitext(full)[1].lower()
        readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
        if suffix == ".txt":
            rows = _txt(full, path, txt_documents)
        elif suffix in readers:
            rows = readers[suffix](full, path)
        else:
            raise DataError(f"{path}: unknown file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    for row in itertools.islice(rows, max_rows):
        if row.error and on_error == "raise":
            raise DataError(row.error)
        yield row


def first_readable(rows: list[Row]) -> Row:
    """The first row that could be read; DataError with the first error when none could."""
    for row in rows:
        if row.error is None:
            return row
    raise DataError(f"no row could be read; first error: {rows[0].error}")


def _bad_bytes(loc: str, text: str) -> str | None:
    """Error for a row whose text holds bytes that are not UTF-8 (None when it has none)."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    byte = ord(m.group()) - 0xDC00
    return (f"{loc}: not valid UTF-8 (byte 0x{byte:02x} at column {m.start() + 1}); re-save the file as "
            "UTF-8, or set data.on_error: skip to drop such rows")


def _strings(value: Any) -> str:
    """Every string inside a parsed JSON/CSV value, joined (to look for undecodable bytes)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "".join(_strings(k) + _strings(v) for k, v in value.items())
    if isinstance(value, list):
        return "".join(_strings(v) for v in value)
    return ""


def _row(loc: str, value: Any) -> Row:
    bad = _bad_bytes(loc, _strings(value))
    if bad:
        return Row(loc, {}, bad)
    if not isinstance(value, dict):
        return Row(loc, {}, f"{loc}: expected an object with named fields, found {type_name(value)}")
    return Row(loc, value)


def _jsonl(full: str, name: str) -> Iterator[Row]:
    with open(full, encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            loc = f"{name}:{lineno}"
            bad = _bad_bytes(loc, line)
            if bad:
                yield Row(loc, {}, bad)
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Row(loc, {}, f"{loc}: invalid JSON: {exc}")
                continue
            yield _row(loc, value)


def _json(full: str, name: str) -> Iterator[Row]:
    with open(full, encoding="utf-8", errors="surrogateescape") as fh:
        text = fh.read()
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        m = _SURROGATE.search(text)
        line = text.count("\n", 0, m.start()) + 1 if m else exc.lineno
        raise DataError(_bad_bytes(f"{name}:{line}", text[m.start():]) if m
                        else f"{name}:{exc.lineno}: invalid JSON: {exc}") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(
            f"{name}: expected a list of objects or {{\"data\": [...]}}, found {type_name(value)}"
        )
    for i, item in enumerate(value, start=1):
        yield _row(f"{name}: row {i}", item)


def _csv(full: str, name: str) -> Iterator[Row]:
    """Header row names the fields; every value is a str and an empty cell is null."""
    with open(full, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            # line_num is the physical line where this record ended (header is line 1).
            loc = f"{name}:{reader.line_num}"
            if None in row:
                yield Row(loc, {}, f"{loc}: more values than header columns {reader.fieldnames}")
                continue
            yield _row(loc, {k: (None if v == "" else v) for k, v in row.items()})


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


def _txt_files(full: str, name: str) -> list[str]:
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.lower().endswith(".txt"))
    if not files:
        raise DataError(f"{name}: directory holds no .txt files (a directory is read as a plain-text corpus)")
    return files


def _txt(full: str, name: str, documents: str) -> Iterator[Row]:
    """One ``{"text"}`` row per file (``documents="file"``) or per blank-line-separated block."""
    with open(full, encoding="utf-8", errors="surrogateescape") as fh:
        text = fh.read()
    if documents == "file":
        if text.strip():
            yield _text_row(f"{name}:1", text.strip("\n"))
        return
    block, start = [], 0
    for lineno, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            block, start = block + [line], start or lineno
        elif block:
            yield _text_row(f"{name}:{start}", "\n".join(block))
            block, start = [], 0


def _text_row(loc: str, text: str) -> Row:
    bad = _bad_bytes(loc, text)
    return Row(loc, {}, bad) if bad else Row(loc, {"text": text})
