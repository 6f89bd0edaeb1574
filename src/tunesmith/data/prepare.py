"""``tunesmith prepare``: stream a corpus through validation and tokenization once, into the cache of
data/cache.py.

The source is read one row at a time and cut into shards of ``shard_rows`` rows; each shard is tokenized by
one of ``workers`` processes (at most two shards a worker in flight, so memory stays flat however large the
corpus) and written by this process as soon as it is done, its JSON last. A killed prepare leaves whole
shards and at most a few ``*.tmp`` files: run it again and it skips the shards that are there, reading past
their rows without tokenizing them. ``manifest.json`` comes when every shard is written.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .cache import cache_dir, check_shape
from .chat import ChatRenderer
from .errors import DataError
from .formats import apply_field_map, check_objective, detect_format, normalize
from .readers import Row, iter_rows
from .tokenize import text_docs, tokenize_lm

_STATE: dict = {}   # what a worker needs: tokenizer, data config, format, shape, max_seq_len


@dataclass
class Prepared:
    root: Path
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    rows_written: int = 0     # rows and tokens of the shards this call wrote (the throughput's numerator)
    tokens_written: int = 0

    def line(self) -> str:
        t = max(self.seconds, 1e-9)
        rate = f"{self.rows_written / t:.0f} rows/s, {self.tokens_written / t:.0f} tokens/s"
        return (f"prepared {self.root}: {self.rows} rows -> {self.examples} examples, {self.tokens} tokens; "
                f"{self.shards_written} shards written, {self.shards_reused} already there; "
                f"{self.seconds:.1f} s ({rate} for the shards written)")


def _init(state: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE.clear()
    _STATE.update(state)
    _STATE["renderer"] = ChatRenderer(state["tokenizer"], state["cfg"].system_prompt)


def tokenize_shard(rows: list[tuple[str, dict, str | None]]) -> tuple[bytes, dict]:
    """One shard: ``(int32 input ids then labels, end to end; its JSON)``."""
    st = _STATE
    cfg, fmt, tok = st["cfg"], st["format"], st["tokenizer"]
    meta = {"read": len(rows), "unreadable": [], "invalid": [], "dropped": [], "truncated": 0}
    good = []
    for loc, data, error in rows:
        if error:
            meta["unreadable"].append(error)
            continue
        try:
            good.append((loc, normalize(apply_field_map(Row(loc, data), cfg.field_map), fmt)))
        except DataError as e:
            if cfg.on_error == "raise":
                raise
            meta["invalid"].append(str(e))
    ids, labels, lengths, sources = [], [], [], []
    if fmt == "text":   # whole documents: truncation and packing happen when the cache is read
        for i, doc in enumerate(text_docs(good, tok)):
            ids += doc
            labels += doc
            lengths.append(len(doc))
            sources.append(i)
    else:
        for i, pair in enumerate(good):
            out = tokenize_lm([pair], fmt, tok, st["renderer"], max_seq_len=st["max_seq_len"], objective=st["shape"],
                              packing=False, truncation=cfg.truncation, response_share=cfg.max_response_share)
            if out.dropped:
                meta["dropped"] += out.dropped
                continue
            meta["truncated"] += out.truncated
            ex = out.examples[0]
            ids += ex["input_ids"]
            labels += ex["labels"]
            lengths.append(len(ex["input_ids"]))
            sources.append(i)
    meta.update(good=len(good), lengths=lengths, rows=sources)
    return np.asarray(ids + labels, dtype=np.int32).tobytes(), meta


def _work(task):
    split, index, rows = task
    return (split, index, *tokenize_shard(rows))


def _write(root: Path, split: str, index: int, data: bytes, meta: dict) -> None:
    d = root / split
    d.mkdir(parents=True, exist_ok=True)
    name = f"shard-{index:05d}"
    for suffix, payload in ((".bin", data), (".json", json.dumps(meta, sort_keys=True).encode())):
        tmp = d / f"{name}{suffix}.tmp"
        tmp.write_bytes(payload)
        os.replace(tmp, d / f"{name}{suffix}")


def _done(root: Path, split: str, index: int) -> bool:
    base = root / split / f"shard-{index:05d}"
    return base.with_suffix(".json").is_file() and base.with_suffix(".bin").is_file()


def _count_lines(path: str, limit: int | None) -> int | None:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full) or not full.lower().endswith((".jsonl", ".csv")):
        return None
    n = 0
    with open(full, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return min(n, limit) if limit else n


def _format(cfg) -> str:
    if cfg.format != "auto":
        return cfg.format
    for row in iter_rows(cfg.train, cfg.max_rows, "train file", on_error=cfg.on_error, txt_documents=cfg.txt_documents,
                         source=cfg.source()):
        if row.error is None:
            return detect_format(apply_field_map(row, cfg.field_map))
    raise DataError(f"{cfg.train}: no row could be read")


def prepare(cfg, tokenizer, *, objective, max_seq_len: int, workers: int = 1, shard_rows: int = 2000,
            progress: bool = True, stop_after: int | None = None) -> Prepared:
    """Write (or finish) the cache of data config ``cfg`` for ``objective``; ``stop_after``: raise
    KeyboardInterrupt once that many shards are written (an interrupted prepare, for tests)."""
    shape = check_shape(objective)
    root, fp = cache_dir(cfg, tokenizer, max_seq_len=max_seq_len, shape=shape)
    result = Prepared(root)
    if (root / "manifest.json").is_file():
        info = json.loads((root / "manifest.json").read_text())
        result.rows, result.examples, result.tokens = info["rows"], info["examples"], info["tokens"]
        result.shards_reused = info["shards"]
        return result
    fmt = _format(cfg)
    check_objective(fmt, objective)
    packing = fmt == "text" if cfg.packing is None else cfg.packing
    if packing and fmt != "text":
        raise DataError(f"data.packing=true needs format text, but the format is {fmt!r}")
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / "state.json"
    if state_path.is_file():
        shard_rows = json.loads(state_path.read_text())["shard_rows"]   # a resume cuts where the first run cut
    else:
        state_path.write_text(json.dumps({"shard_rows": shard_rows, "fingerprint": fp}, sort_keys=True, indent=1))
    state = {"tokenizer": tokenizer, "cfg": cfg, "format": fmt, "shape": shape, "max_seq_len": max_seq_len}
    val_path, val_source = cfg.validation_source()
    splits = [("train", cfg.train, cfg.max_rows, cfg.source())] + (
        [("validation", val_path, None, val_source)] if val_path else [])
    total = [_count_lines(p, n) for _, p, n, _ in splits]
    bar = tqdm(total=None if None in total else sum(total), unit="row", desc="prepare", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    pool = None
    if workers > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_init, initargs=(state,))
    else:
        _init(state)
    pending: deque = deque()

    def finish_one() -> None:
        split, index, data, meta = pending.popleft().get() if pool else pending.popleft()
        _write(root, split, index, data, meta)
        result.shards_written += 1
        result.rows_written += meta["read"]
        result.tokens_written += sum(meta["lengths"])
        bar.update(meta["read"])
        if stop_after is not None and result.shards_written >= stop_after:
            raise KeyboardInterrupt(f"prepare stopped after {stop_after} shards")

    try:
        for split, path, limit, source in splits:
            rows = iter_rows(path, limit, f"{split} file", on_error=cfg.on_error, txt_documents=cfg.txt_documents,
                             source=source)
            index, chunk = 0, []
            for row in _chunks(rows, shard_rows):
                if _done(root, split, index):
                    result.shards_reused += 1
                    bar.update(len(row))
                else:
                    chunk = [(r.loc, r.data, r.error) for r in row]
                    pending.append(pool.apply_async(_work, ((split, index, chunk),)) if pool else
                                   _work((split, index, chunk)))
                    while len(pending) >= (2 * workers if pool else 1):
                        finish_one()
                index += 1
        while pending:
            finish_one()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    result.seconds = time.perf_counter() - t0
    _finish(root, cfg, fmt, packing, max_seq_len, result)
    return result


def _chunks(rows, n: int):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _finish(root: Path, cfg, fmt: str, packing: bool, max_seq_len: int, result: Prepared) -> None:
    """Check what was dropped against data.max_drop_fraction, then write manifest.json (the cache is complete)."""
    totals = {"rows": 0, "examples": 0, "tokens": 0, "dropped": 0, "shards": 0, "splits": {}}
    reasons = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        s = {"rows": 0, "examples": 0, "tokens": 0, "dropped": 0, "shards": 0}
        for meta_path in sorted(split_dir.glob("shard-*.json")):
            meta = json.loads(meta_path.read_text())
            s["rows"] += meta["read"]
            s["examples"] += len(meta["lengths"])
            s["tokens"] += sum(meta["lengths"])
            s["dropped"] += len(meta["dropped"])
            reasons += meta["dropped"][:1]
            s["shards"] += 1
        totals["splits"][split_dir.name] = s
        for k in ("rows", "examples", "tokens", "dropped", "shards"):
            totals[k] += s[k]
    from .build import check_drops
    check_drops(cfg, totals["dropped"], reasons, max(totals["rows"], 1), max_seq_len)   # no manifest then
    result.rows, result.examples, result.tokens = totals["rows"], totals["examples"], totals["tokens"]
    manifest = {"format": fmt, "packing": packing, **totals}
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, sort_keys=True, indent=1))
    os.replace(tmp, root / "manifest.json")
