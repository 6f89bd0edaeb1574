"""build_datasets: config + tokenizer -> tokenized train/validation datasets and a report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .chat import ChatRenderer
from .config import DataConfig
from .errors import DataError
from .formats import OBJECTIVE_FORMATS, apply_field_map, check_objective, detect_format, normalize
from .labels import check_labels, label_vocab
from .readers import Row, read_rows
from .tokenize import Tokenized, tokenize_cls, tokenize_lm, tokenize_pref

MAX_REASONS = 10


class TokenizedDataset(Dataset):
    """A list of tokenized example dicts (see :mod:`tunesmith.data.tokenize` for the keys)."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    def num_tokens(self) -> int:
        """Total tokens over every ``*input_ids`` list (chosen + rejected for preference)."""
        return sum(len(v) for ex in self.examples for k, v in ex.items() if k.endswith("input_ids"))


@dataclass
class DataReport:
    """What build_datasets read, kept and dropped."""

    train_rows: int
    validation_rows: int
    skipped: int
    skipped_reasons: list[str]
    train_tokens: int
    label_names: list[str] | None
    num_labels: int | None
    format: str


class _Skips:
    def __init__(self) -> None:
        self.count, self.reasons = 0, []

    def add(self, messages: list[str]) -> None:
        self.count += len(messages)
        self.reasons.extend(messages[: MAX_REASONS - len(self.reasons)])


def _validate(raw: list[Row], fmt: str, on_error: str, skips: _Skips, path: str):
    """``(loc, canonical row)`` pairs; bad rows raise or are skipped per ``on_error``."""
    good, bad = [], []
    for row in raw:
        try:
            good.append((row.loc, normalize(row, fmt)))
        except DataError as exc:
            if on_error == "raise":
                raise
            bad.append(str(exc))
    if not good:
        raise DataError(f"{path}: every row is invalid for format {fmt} ({len(raw)} rows); "
                        f"first error: {bad[0]}")
    skips.add(bad)
    return good


def _split(rows: list, val_split: float, seed: int, path: str) -> tuple[list, list]:
    """Deterministic (train, validation) split of ``rows``; both keep file order."""
    n = len(rows)
    n_val = max(1, round(n * val_split))
    if n_val >= n:
        raise DataError(f"{path}: val_split={val_split} of {n} rows leaves no training rows; "
                        "add rows, lower val_split or set data.validation")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(perm[:n_val])
    return ([r for i, r in enumerate(rows) if i not in val_idx],
            [r for i, r in enumerate(rows) if i in val_idx])


def build_datasets(cfg: DataConfig, tokenizer, *, max_seq_len: int, objective: str, seed: int
                   ) -> tuple[TokenizedDataset, TokenizedDataset | None, DataReport]:
    """Read, validate, split and tokenize the data of ``cfg`` for ``objective``.

    ``objective`` is one of sft, pt, cls, rm, dpo. Returns ``(train, validation or None, report)``.
    """
    if objective not in OBJECTIVE_FORMATS:
        raise DataError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVE_FORMATS)}")
    if max_seq_len < 1:
        raise DataError(f"max_seq_len must be >= 1, got {max_seq_len}")
    raw = [apply_field_map(r, cfg.field_map) for r in read_rows(cfg.train, cfg.max_rows, "train file")]
    fmt = detect_format(raw[0]) if cfg.format == "auto" else cfg.format
    check_objective(fmt, objective)
    packing = fmt == "text" if cfg.packing is None else cfg.packing
    if packing and fmt != "text":
        raise DataError(f"data.packing=true needs format text, but the format is {fmt!r}; "
                        "set data.packing to false or null")

    skips = _Skips()
    train = _validate(raw, fmt, cfg.on_error, skips, cfg.train)
    names = mapping = None
    if fmt == "classification":  # vocabulary from the whole train file, before any split
        names, mapping = label_vocab(train, cfg.label_names, cfg.train)
        known = "in data.label_names" if cfg.label_names else "among the train labels"
        train = _check_labels(train, mapping, names, known, cfg.on_error, skips, cfg.train)
    val_name = cfg.validation or f"{cfg.train} (validation split)"
    if cfg.validation:
        vraw = [apply_field_map(r, cfg.field_map) for r in read_rows(cfg.validation, None, "validation file")]
        val = _validate(vraw, fmt, cfg.on_error, skips, cfg.validation)
        if mapping is not None:
            val = _check_labels(val, mapping, names, known, cfg.on_error, skips, cfg.validation)
    elif cfg.val_split > 0:
        train, val = _split(train, cfg.val_split, seed, cfg.train)
    else:
        val = None

    def tok(rows, path: str) -> TokenizedDataset:
        out = _tokenize(rows, fmt, objective, tokenizer, cfg, mapping, max_seq_len, packing)
        skips.add(out.dropped)
        if not out.examples:
            raise DataError(f"{path}: no examples left after filtering ({len(out.dropped)} dropped; "
                            f"first: {out.dropped[0] if out.dropped else 'none'})")
        return TokenizedDataset(out.examples)

    train_ds = tok(train, cfg.train)
    val_ds = tok(val, val_name) if val is not None else None
    report = DataReport(
        train_rows=len(train_ds), validation_rows=len(val_ds) if val_ds is not None else 0,
        skipped=skips.count, skipped_reasons=skips.reasons, train_tokens=train_ds.num_tokens(),
        label_names=names, num_labels=len(names) if names is not None else None, format=fmt,
    )
    return train_ds, val_ds, report


def _check_labels(rows, mapping, names, known, on_error: str, skips: _Skips, path: str):
    good, bad = check_labels(rows, mapping, names, known)
    if bad and on_error == "raise":
        raise DataError(bad[0])
    if not good:
        raise DataError(f"{path}: no row has a known label; first error: {bad[0]}")
    skips.add(bad)
    return good


def _tokenize(rows, fmt, objective, tokenizer, cfg: DataConfig, mapping, max_seq_len, packing
              ) -> Tokenized:
    if objective in ("sft", "pt"):
        renderer = ChatRenderer(tokenizer, cfg.system_prompt)
        return tokenize_lm(rows, fmt, tokenizer, renderer, max_seq_len=max_seq_len,
                           objective=objective, packing=packing)
    if objective == "cls":
        return tokenize_cls(rows, tokenizer, mapping, max_seq_len=max_seq_len)
    return tokenize_pref(rows, tokenizer, ChatRenderer(tokenizer), max_seq_len=max_seq_len)
