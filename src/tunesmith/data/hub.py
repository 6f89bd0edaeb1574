"""Data named through the Hugging Face ``datasets`` library: a dataset name (``owner/name``), a folder of data
files (JSONL, JSON, CSV, parquet, arrow) or a folder written by ``Dataset.save_to_disk``.

``data.train`` is such a source when it is not a file: a folder without .txt files (a folder of .txt files
stays a plain-text corpus), or a name that is not a local path. ``data.hf_split`` picks the split,
``data.hf_subset`` the configuration, and ``data.hf_streaming`` reads the rows one at a time without
downloading or converting the whole set first (for corpora larger than the disk cache or memory). Rows are
located as ``SOURCE[split]: row N``.
"""
from __future__ import annotations

import os
import re
from typing import Iterator

from .errors import DataError

NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".gz", ".zst")
DATA_FILES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_datasets_source(path: str) -> bool:
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(full):
        return False
    if os.path.isdir(full):
        names = [f.lower() for _, _, fs in os.walk(full) for f in fs]
        return not any(f.endswith(".txt") for f in names) and any(
            f in SAVED or f.endswith(DATA_FILES) for f in names)
    return bool(NAME.match(path)) and not path.lower().endswith(FILE_SUFFIXES)


def datasets_rows(path: str, *, split: str = "train", subset: str | None = None,
                  streaming: bool = False) -> Iterator:
    """The rows of ``split`` of the datasets source ``path``, as readers.Row."""
    from .readers import Row
    try:
        import datasets
    except ImportError:   # pragma: no cover - datasets is a dev dependency
        raise DataError(f"{path}: reading a datasets source needs the datasets package (pip install datasets)") from None
    full = os.path.abspath(os.path.expanduser(path))
    try:
        if os.path.isdir(full) and any(os.path.isfile(os.path.join(full, f)) for f in SAVED):
            ds = datasets.load_from_disk(full)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(full if os.path.isdir(full) else path, subset, split=split, streaming=streaming)
    except KeyError:
        raise DataError(f"{path}: the saved dataset has no split {split!r} (data.hf_split)") from None
    except Exception as e:   # datasets raises many types: not found, offline, bad split, bad files
        raise DataError(f"{path}: the datasets library cannot load split {split!r}: {type(e).__name__}: {e} "
                        "(data.train is read as a datasets name or folder because it is not a file)") from None
    for i, row in enumerate(ds, start=1):
        yield Row(f"{path}[{split}]: row {i}", dict(row))
