"""Data pipeline: read -> validate -> format -> tokenize (labels masked) -> pack/batch."""

from .build import DataReport, TokenizedDataset, build_datasets
from .collate import batch_indices, collate, pad_id_for
from .config import DataConfig
from .errors import DataError

__all__ = [
    "DataConfig",
    "DataError",
    "DataReport",
    "TokenizedDataset",
    "batch_indices",
    "build_datasets",
    "collate",
    "pad_id_for",
]
