"""Data pipeline: read -> validate -> format -> tokenize (labels masked) -> pack/batch.

``DataConfig``, ``DataError`` and the collate functions import without torch (config validation
needs them first); the dataset builder loads on first use.
"""

from .collate import batch_indices, collate, pad_id_for
from .config import DataConfig
from .errors import DataError

_LAZY = {"DataReport": "build", "TokenizedDataset": "build", "build_datasets": "build"}

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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
