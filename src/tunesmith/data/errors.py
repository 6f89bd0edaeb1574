"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data or data settings.

    Messages name the place (``FILE:LINE`` for JSONL/CSV, ``FILE: row N`` for JSON/parquet),
    the field, the value found and what would be valid.
    """


def short(value: object, limit: int = 60) -> str:
    """``repr`` of ``value``, cut to ``limit`` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value: object) -> str:
    """JSON-flavoured type name (``str``, ``int``, ``list``, ``dict``, ``null``)."""
    return "null" if value is None else type(value).__name__
