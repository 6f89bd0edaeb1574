"""The prepared-data cache: tokenized examples on disk, written by ``tunesmith prepare`` (data/prepare.py) and
read by training when ``data.cache`` is set.

A cache is one directory ``<data.cache>/<key>/``, where ``key`` is the first 16 hex digits of the sha256 of
its fingerprint: the data settings that change the tokens, the source files' sizes and modification times,
``train.max_seq_len``, the objective's tokenized shape and the tokenizer (its vocabulary and merges, special
tokens and chat template). A changed tokenizer or setting therefore names another directory and the old one
is never read. The validation split (``data.val_split``, ``train.seed``) is drawn when the cache is read, so
one cache serves every seed.

Layout: ``<split>/shard-NNNNN.bin`` (int32 input ids then int32 labels of the shard's examples, end to end)
and ``<split>/shard-NNNNN.json`` (example lengths, the source row of each, the rows read, kept and
dropped), the JSON renamed into place last; ``manifest.json``, written when every shard is, marks the cache
complete. Nothing in it depends on time or on the number of workers, so a resumed prepare gives the same
bytes as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .errors import DataError

VERSION = 1
SHAPES = ("sft", "pt")          # the tokenized shapes a cache holds
IGNORED_FIELDS = ("cache", "val_split")   # data fields that do not change the cached tokens
KINDS = ("unreadable", "invalid", "dropped")  # why a row gave no example (dropped: nothing left to train on)


def tokenizer_signature(tokenizer) -> str:
    """sha256 of what decides the token ids: vocabulary and merges, special tokens, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:   # without the truncation and padding state each call of the tokenizer leaves there
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str([getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")]).encode())
    return h.hexdigest()


def _source_identity(path: str | None) -> Any:
    if path is None:
        return None
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs)
        return [[os.path.relpath(f, full), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    if os.path.isfile(full):
        st = os.stat(full)
        return [full, st.st_size, st.st_mtime_ns]
    return path   # a datasets name


def fingerprint(data_cfg, tokenizer, *, max_seq_len: int, shape: str) -> dict:
    fields = {k: v for k, v in data_cfg.model_dump(mode="json").items() if k not in IGNORED_FIELDS}
    return {"version": VERSION, "data": fields, "max_seq_len": max_seq_len, "shape": shape,
            "sources": {"train": _source_identity(data_cfg.train), "validation": _source_identity(data_cfg.validation)},
            "tokenizer": tokenizer_signature(tokenizer)}


def cache_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(data_cfg, tokenizer, *, max_seq_len: int, shape: str) -> tuple[Path, dict]:
    if not data_cfg.cache:
        raise DataError("data.cache is not set; name a directory for the prepared data (e.g. data.cache=cache)")
    fp = fingerprint(data_cfg, tokenizer, max_seq_len=max_seq_len, shape=shape)
    return Path(data_cfg.cache) / cache_key(fp), fp


def check_shape(objective) -> str:
    shape = objective.tokenized
    if shape not in SHAPES:
        raise DataError(f"data.cache holds causal-LM data (the sft and pt objectives); objective "
                        f"{objective.name!r} reads {shape!r} examples, tokenized at the start of each run instead "
                        "(unset data.cache)")
    return shape


# -- reading ----------------------------------------------------------------------------------------------

class CachedDataset(Dataset):
    """Examples of a cache, read from the shards' memory maps when asked for."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.items[i]
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.items)


def read_split(root: Path, split: str) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], dict]:
    """``(ids, labels, source row)`` of every example of ``split``, and the split's totals."""
    out, totals = [], {"read": 0, "good": 0, "truncated": 0}
    for kind in KINDS:
        totals[kind], totals[f"{kind}_n"] = [], 0
    for meta_path in sorted((root / split).glob("shard-*.json")):
        meta = json.loads(meta_path.read_text())
        tokens = np.memmap(meta_path.with_suffix(".bin"), dtype=np.int32, mode="r")
        n_tok = sum(meta["lengths"])
        ids_all, labels_all = tokens[:n_tok], tokens[n_tok:]
        start = 0
        for length, row in zip(meta["lengths"], meta["rows"]):
            out.append((ids_all[start:start + length], labels_all[start:start + length], totals["good"] + row))
            start += length
        for key in ("read", "good", "truncated"):
            totals[key] += meta[key]
        for kind in KINDS:
            totals[f"{kind}_n"] += len(meta[kind])
            totals[kind] += meta[kind][:10]
    return out, totals


def load_cached(cfg, tokenizer, *, max_seq_len: int, objective, seed: int):
    """``(train, validation or None, DataReport)`` from the prepared cache: the examples build_datasets makes."""
    from .build import SHAPE_CUTS, DataReport, _split
    from .tokenize import NO_LABELS, text_blocks
    shape = check_shape(objective)
    root, _ = cache_dir(cfg, tokenizer, max_seq_len=max_seq_len, shape=shape)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        others = sorted(p.name for p in Path(cfg.cache).glob("*/manifest.json")) if Path(cfg.cache).is_dir() else []
        why = (" (a prepare of this config was interrupted; run it again to finish)" if root.is_dir() else
               f" (the caches there, {', '.join(others)}, were prepared with another tokenizer or data settings)"
               if others else "")
        raise DataError(f"data.cache {cfg.cache}: no prepared data for this config and tokenizer at {root}{why}; "
                        "run `tunesmith prepare CONFIG` first")
    info = json.loads(manifest.read_text())
    fmt, packing = info["format"], info["packing"]
    train, t_tot = read_split(root, "train")
    val_path, _ = cfg.validation_source()
    val, v_tot = read_split(root, "validation") if val_path else ([], None)
    if not val_path and cfg.val_split > 0:
        kept_rows = set(_split(list(range(t_tot["good"])), cfg.val_split, seed, cfg.train)[1])
        val = [e for e in train if e[2] in kept_rows]
        train = [e for e in train if e[2] not in kept_rows]
    truncated = t_tot["truncated"] + (v_tot["truncated"] if v_tot else 0)

    def dataset(examples, name):
        if fmt == "text":
            nonlocal truncated
            blocks = text_blocks([e[0].tolist() for e in examples], max_seq_len=max_seq_len, packing=packing)
            truncated += blocks.truncated
            items = [(np.asarray(b["input_ids"], np.int32), np.asarray(b["labels"], np.int32)) for b in blocks.examples]
        else:
            items = [(e[0], e[1]) for e in examples]
        if not items:
            raise DataError(f"{name}: no examples left in the prepared cache {root}")
        return CachedDataset(items)

    train_ds = dataset(train, cfg.train)
    val_ds = dataset(val, val_path or f"{cfg.train} (validation split)") if val else None
    tots = [t for t in (t_tot, v_tot) if t]
    counts = {kind: sum(t[f"{kind}_n"] for t in tots) for kind in KINDS}
    kinds = {(NO_LABELS if k == "dropped" else k): n for k, n in counts.items() if n}
    reasons = [r for t in tots for k in KINDS for r in t[k]][:10]
    report = DataReport(
        train_rows=len(train_ds), validation_rows=len(val_ds) if val_ds is not None else 0,
        skipped=sum(counts.values()), skipped_reasons=reasons,
        train_tokens=train_ds.num_tokens(), label_names=None, num_labels=None, format=fmt,
        rows_read=sum(t["read"] for t in tots), truncated=truncated, skipped_kinds=kinds, max_seq_len=max_seq_len,
        truncation=cfg.truncation, packed=packing, cut=SHAPE_CUTS.get(shape))
    return train_ds, val_ds, report
