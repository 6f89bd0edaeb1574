"""build_datasets: config + tokenizer -> tokenized train/validation datasets and a report."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from .chat import ChatRenderer
from .config import DataConfig
from .errors import DataError
from .formats import apply_field_map, check_objective, detect_format, normalize
from .labels import check_labels, label_vocab
from .readers import Row, first_readable, read_rows
from .tokenize import NO_LABELS, SHAPES, Tokenized

MAX_REASONS = 10
CUTS = {"middle": "the prompt cut in the middle, the response kept",
        "left": "the prompt cut at its start, the response kept", "right": "cut at the end"}
# How the shapes that do not follow data.truncation cut a row (the others: CUTS[data.truncation]).
SHAPE_CUTS = {"pt": "cut at the end", "cls": "cut at the end", "seq2seq": "source and target cut at their end",
              "rollout": "the prompt's start cut"}


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
    """What build_datasets read, kept, truncated and dropped; :meth:`line` says it in one line."""

    train_rows: int
    validation_rows: int
    skipped: int
    skipped_reasons: list[str]
    train_tokens: int
    label_names: list[str] | None
    num_labels: int | None
    format: str
    rows_read: int = 0
    truncated: int = 0
    skipped_kinds: dict[str, int] = field(default_factory=dict)
    max_seq_len: int = 0
    truncation: str = "middle"
    packed: bool = False
    cut: str | None = None   # how a row was cut, when not by data.truncation (SHAPE_CUTS)

    def line(self) -> str:
        """``data: ...`` — examples kept, rows truncated (and how), rows dropped (and why)."""
        kept = f"{self.train_rows} train + {self.validation_rows} validation examples"
        head = f"data: {self.rows_read} rows -> {kept}" + (" (packed into blocks)" if self.packed else "")
        cut = f"{self.truncated} truncated to max_seq_len={self.max_seq_len}"
        if self.truncated:
            how = self.cut or ("cut at the end" if self.format == "text" else CUTS.get(self.truncation, self.truncation))
            cut += f" ({how})"
        if not self.skipped:
            return f"{head}; {cut}; 0 dropped"
        why = ", ".join(f"{n} {kind}" for kind, n in self.skipped_kinds.items())
        return f"{head}; {cut}; {self.skipped} dropped ({why}), first: {self.skipped_reasons[0]}"


class _Skips:
    def __init__(self) -> None:
        self.count, self.reasons, self.kinds = 0, [], Counter()

    def add(self, messages: list[str], kind: str) -> None:
        self.count += len(messages)
        if messages:
            self.kinds[kind] += len(messages)
        self.reasons.extend(messages[: MAX_REASONS - len(self.reasons)])


def _validate(raw: list[Row], fmt: str, on_error: str, skips: _Skips, path: str):
    """``(loc, canonical row)`` pairs; bad rows raise or are skipped per ``on_error``."""
    good, bad, unreadable = [], [], []
    for row in raw:
        if row.error:  # only passed on with on_error skip
            unreadable.append(row.error)
            continue
        try:
            good.append((row.loc, normalize(row, fmt)))
        except DataError as exc:
            if on_error == "raise":
                raise
            bad.append(str(exc))
    if not good:
        raise DataError(f"{path}: every row is invalid for format {fmt} ({len(raw)} rows); "
                        f"first error: {(unreadable + bad)[0]}")
    skips.add(unreadable, "unreadable")
    skips.add(bad, "invalid")
    return good


def _check_txt(path: str, fmt: str) -> None:
    from .hub import is_datasets_source
    if (os.path.isdir(path) or path.lower().endswith(".txt")) and fmt != "text" and not is_datasets_source(path):
        raise DataError(f"{path}: plain text (.txt) is read as format text (one document per file or per "
                        f"blank-line block, see data.txt_documents), not {fmt}; set data.format to text or auto")


def check_drops(cfg: DataConfig, dropped: int, reasons: list[str], rows: int, max_seq_len: int) -> None:
    """With on_error raise: DataError when truncation would drop more than max_drop_fraction of the rows
    (``dropped`` of ``rows``; ``reasons``: messages, the first drop's among them). `tunesmith prepare` too."""
    if cfg.on_error != "raise" or dropped <= cfg.max_drop_fraction * rows:
        return
    first = next((r for r in reasons if NO_LABELS in r), "")
    raise DataError(
        f"{dropped} of {rows} rows ({dropped / rows:.0%}) would be dropped: {NO_LABELS} to "
        f"max_seq_len={max_seq_len} with data.truncation: {cfg.truncation}, more than data.max_drop_fraction="
        f"{cfg.max_drop_fraction} (first: {first}). Raise train.max_seq_len, use data.truncation: middle or "
        "left (keeps the response), or accept the loss with a higher data.max_drop_fraction or "
        "data.on_error: skip")


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


def build_datasets(cfg: DataConfig, tokenizer, *, max_seq_len: int, objective, seed: int, transform=None
                   ) -> tuple[TokenizedDataset, TokenizedDataset | None, DataReport]:
    """Read, validate, split and tokenize the data of ``cfg`` for ``objective``.

    ``objective``: an objective's name or config (what it declares: the data ``formats`` it reads and
    the ``tokenized`` shape it consumes); ``transform(row, fmt)``: applied to every canonical row
    (``data.mixture``'s task tags). Returns ``(train, validation or None, report)``; with ``cfg.mixture``
    the mixed set of :mod:`tunesmith.data.mixture`.
    """
    if cfg.mixture:
        from .mixture import build_mixture
        return build_mixture(cfg, tokenizer, max_seq_len=max_seq_len, objective=objective, seed=seed)
    if isinstance(objective, str):
        from ..train.objectives import config_class   # torch-free
        try:
            objective = config_class(objective).model_construct()   # its declarations; fields unvalidated
        except Exception as e:
            raise DataError(str(e).split(": ", 1)[-1]) from None
    if max_seq_len < 1:
        raise DataError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if cfg.cache:   # prepared by `tunesmith prepare` (data/cache.py)
        from .cache import load_cached
        return load_cached(cfg, tokenizer, max_seq_len=max_seq_len, objective=objective, seed=seed)
    read = dict(on_error=cfg.on_error, txt_documents=cfg.txt_documents)
    raw = [apply_field_map(r, cfg.field_map) for r in read_rows(cfg.train, cfg.max_rows, "train file", **read,
                                                                source=cfg.source())]
    val_path, val_source = cfg.validation_source()
    fmt = detect_format(first_readable(raw)) if cfg.format == "auto" else cfg.format
    _check_txt(cfg.train, fmt)
    check_objective(fmt, objective)
    packing = fmt == "text" if cfg.packing is None else cfg.packing
    if packing and fmt != "text":
        raise DataError(f"data.packing=true needs format text, but the format is {fmt!r}; "
                        "set data.packing to false or null")

    skips = _Skips()
    train = _validate(raw, fmt, cfg.on_error, skips, cfg.train)
    if transform is not None:
        train = [(loc, transform(r, fmt)) for loc, r in train]
    names = mapping = None
    if fmt == "classification":  # vocabulary from the whole train file, before any split
        names, mapping = label_vocab(train, cfg.label_names, cfg.train)
        known = "in data.label_names" if cfg.label_names else "among the train labels"
        train = _check_labels(train, mapping, names, known, cfg.on_error, skips, cfg.train)
    val_name = val_path or f"{cfg.train} (validation split)"
    if val_path:
        _check_txt(val_path, fmt)
        vraw = [apply_field_map(r, cfg.field_map)
                for r in read_rows(val_path, None, "validation file", **read, source=val_source)]
        val = _validate(vraw, fmt, cfg.on_error, skips, val_name)
        if transform is not None:
            val = [(loc, transform(r, fmt)) for loc, r in val]
        if mapping is not None:
            val = _check_labels(val, mapping, names, known, cfg.on_error, skips, val_name)
    elif cfg.val_split > 0:
        train, val = _split(train, cfg.val_split, seed, cfg.train)
    else:
        val = None

    if cfg.augment is not None:
        if fmt != "classification":
            raise DataError(f"data.augment (EDA) augments classification rows; the format is {fmt!r}")
        from .augment import augment_rows
        train = augment_rows(train, cfg.augment, seed)
    truncated = 0

    def tok(rows, path: str) -> TokenizedDataset:
        nonlocal truncated
        out = SHAPES[objective.tokenized](rows, fmt, tokenizer, cfg, mapping=mapping, max_seq_len=max_seq_len,
                                          packing=packing)
        skips.add(out.dropped, NO_LABELS)
        truncated += out.truncated
        if not out.examples:
            raise DataError(f"{path}: no examples left after filtering ({len(out.dropped)} dropped; "
                            f"first: {out.dropped[0] if out.dropped else 'none'})")
        return TokenizedDataset(out.examples)

    train_ds = tok(train, cfg.train)
    val_ds = tok(val, val_name) if val is not None else None
    check_drops(cfg, skips.kinds.get(NO_LABELS, 0), skips.reasons, len(train) + len(val or []), max_seq_len)
    report = DataReport(
        train_rows=len(train_ds), validation_rows=len(val_ds) if val_ds is not None else 0,
        skipped=skips.count, skipped_reasons=skips.reasons, train_tokens=train_ds.num_tokens(),
        label_names=names, num_labels=len(names) if names is not None else None, format=fmt,
        rows_read=len(raw) + (len(vraw) if val_path else 0), truncated=truncated,
        skipped_kinds=dict(skips.kinds), max_seq_len=max_seq_len, truncation=cfg.truncation, packed=packing,
        cut=SHAPE_CUTS.get(objective.tokenized),
    )
    return train_ds, val_ds, report


def _check_labels(rows, mapping, names, known, on_error: str, skips: _Skips, path: str):
    good, bad = check_labels(rows, mapping, names, known)
    if bad and on_error == "raise":
        raise DataError(bad[0])
    if not good:
        raise DataError(f"{path}: no row has a known label; first error: {bad[0]}")
    skips.add(bad, "unknown label")
    return good
