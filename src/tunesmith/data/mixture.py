"""``data.mixture``: several datasets tokenized each with its own settings, then mixed into one training set.

Each entry is built by :func:`build.build_datasets` with the data section's fields overridden by the
entry's (its own format, field map, files, labels), its task tag applied to every row. The training set
then takes from entry i a quota q_i of its n_i examples:

- an entry with ``count`` or ``fraction`` takes exactly that many;
- ``mixing: weights``: p_i = w_i / Σ w_j, ``mixing: temperature``: p_i = n_i^(1/T) / Σ n_j^(1/T)
  (over the entries without a count or fraction, weight 0 excluded); q_i = p_i · Σ n_j, rounded by
  largest remainder so that the quotas add up;
- ``mixing: concat``: q_i = n_i.

Entry i's quota is drawn from a permutation seeded by (seed, i) (again and again when q_i > n_i), so a
seed gives the same training set every time, and a resumed run sees the very examples it saw before
(``Batches`` shuffles this set per epoch from (seed, epoch)). Validation keeps the tasks apart
(:class:`MixedDataset` ``.tasks``) for per-task metrics.
"""

from __future__ import annotations

import math

from .build import DataReport, TokenizedDataset, build_datasets
from .config import DataConfig
from .errors import DataError
from .mixture_config import ENTRY_FIELDS




class MixedDataset(TokenizedDataset):
    """The examples of several tasks; ``tasks`` maps each task name to its own dataset."""

    def __init__(self, tasks: dict[str, TokenizedDataset]):
        super().__init__([ex for ds in tasks.values() for ex in ds.examples])
        self.tasks = tasks


class MixtureReport(DataReport):
    """A DataReport of the whole mixture, with one part per task."""

    parts: dict = {}
    quotas: dict = {}

    def line(self) -> str:
        tasks = ", ".join(f"{name} {self.quotas.get(name, 0)} drawn from {part.train_rows}"
                          + (f" (+{part.validation_rows} val)" if part.validation_rows else "")
                          for name, part in self.parts.items())
        return f"{super().line()}; mixture: {tasks}"


def entry_config(cfg: DataConfig, entry) -> DataConfig:
    """The data section for one entry: its own fields where set, the section's otherwise."""
    own = {k: getattr(entry, k) for k in ENTRY_FIELDS if getattr(entry, k) is not None}
    if entry.tag is not None and entry.tag_as == "system":
        own["system_prompt"] = entry.tag
    base = cfg.model_dump(exclude={"mixture", "mixing", "temperature"})
    return DataConfig.model_validate({**base, **own})


def probabilities(sizes: list[int], weights: list[float], mixing: str, temperature: float) -> list[float]:
    """p_i of the free entries (``sizes``, ``weights`` of those only)."""
    if mixing == "temperature":
        raw = [n ** (1.0 / temperature) for n in sizes]
    elif mixing == "weights":
        raw = list(weights)
    else:  # concat
        raw = [float(n) for n in sizes]
    total = sum(raw)
    return [r / total for r in raw]


def quotas(entries, sizes: list[int], mixing: str, temperature: float) -> list[int]:
    """Training examples taken from each entry (see the module docstring)."""
    out = [0] * len(entries)
    free = []
    for i, (e, n) in enumerate(zip(entries, sizes)):
        if e.weight == 0:
            continue
        if e.count is not None:
            out[i] = e.count
        elif e.fraction is not None:
            out[i] = max(1, round(e.fraction * n))
        else:
            free.append(i)
    if not free:
        return out
    if mixing == "concat":
        for i in free:
            out[i] = sizes[i]
        return out
    total = sum(sizes[i] for i in free)
    p = probabilities([sizes[i] for i in free], [entries[i].weight for i in free], mixing, temperature)
    exact = [pi * total for pi in p]
    q = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(free)), key=lambda k: (-(exact[k] - q[k]), k))
    for k in by_remainder[: total - sum(q)]:
        q[k] += 1
    for k, i in enumerate(free):
        out[i] = q[k]
    return out


def draw(n: int, q: int, seed: int, index: int) -> list[int]:
    """``q`` indices into ``n`` examples: permutations seeded by (seed, index), as many as needed."""
    import torch
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    out: list[int] = []
    while len(out) < q:
        out += torch.randperm(n, generator=g).tolist()[: q - len(out)]
    return out


def tagger(tag: str | None, tag_as: str):
    """A canonical-row transform putting ``tag`` and a newline before the prompt (None: no change)."""
    if tag is None or tag_as != "prefix":
        return None

    def prefix(row: dict, fmt: str) -> dict:
        row = dict(row)
        if fmt == "alpaca":
            row["instruction"] = f"{tag}\n{row['instruction']}"
        elif "messages" in row:
            row["messages"] = _tag_turns(row["messages"], tag)
        elif isinstance(row.get("prompt"), str):
            row["prompt"] = f"{tag}\n{row['prompt']}"
        elif isinstance(row.get("prompt"), list):
            row["prompt"] = _tag_turns(row["prompt"], tag)
        elif isinstance(row.get("text"), str):
            row["text"] = f"{tag}\n{row['text']}"
        return row
    return prefix


def _tag_turns(turns: list[dict], tag: str) -> list[dict]:
    out, done = [], False
    for t in turns:
        if not done and t.get("role") == "user":
            t, done = {**t, "content": f"{tag}\n{t['content']}"}, True
        out.append(t)
    return out


def build_mixture(cfg: DataConfig, tokenizer, *, max_seq_len: int, objective, seed: int):
    """``(train, validation MixedDataset or None, MixtureReport)`` of ``cfg.mixture``; a bad entry
    raises one DataError naming it (``data.mixture[i] (task)``)."""
    parts = []
    for i, e in enumerate(cfg.mixture):
        where = f"data.mixture[{i}] ({e.name})"
        try:
            sub = entry_config(cfg, e)
            tr, va, rep = build_datasets(sub, tokenizer, max_seq_len=max_seq_len, objective=objective, seed=seed,
                                         transform=tagger(e.tag, e.tag_as))
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        except ValueError as exc:  # pydantic: a field of the entry
            raise DataError(f"{where}: {exc}") from None
        if e.tag is not None and e.tag_as == "system" and rep.format not in ("alpaca", "messages", "sharegpt"):
            raise DataError(f"{where}: tag_as system needs a chat format (alpaca, messages, sharegpt), not "
                            f"{rep.format}; use tag_as prefix")
        parts.append((e, tr, va, rep))
    _check_same(parts, "format", "formats")
    _check_same(parts, "label_names", "labels")
    sizes = [len(tr) for _, tr, _, _ in parts]
    q = quotas(cfg.mixture, sizes, cfg.mixing, cfg.temperature)
    examples = [tr[j] for i, (_, tr, _, _) in enumerate(parts) for j in draw(len(tr), q[i], seed, i)]
    train = TokenizedDataset(examples)
    vals = {e.name: va for e, _, va, _ in parts if va is not None}
    val = MixedDataset(vals) if vals else None
    first = parts[0][3]
    report = MixtureReport(
        train_rows=len(train), validation_rows=len(val) if val is not None else 0,
        skipped=sum(r.skipped for *_, r in parts), skipped_reasons=[m for *_, r in parts for m in r.skipped_reasons][:10],
        train_tokens=train.num_tokens(), label_names=first.label_names, num_labels=first.num_labels,
        format=first.format, rows_read=sum(r.rows_read for *_, r in parts), truncated=sum(r.truncated for *_, r in parts),
        skipped_kinds=_merge_kinds(r.skipped_kinds for *_, r in parts), max_seq_len=max_seq_len,
        truncation=cfg.truncation, packed=first.packed, cut=first.cut)
    report.parts = {e.name: r for e, _, _, r in parts}
    report.quotas = {e.name: q[i] for i, (e, *_) in enumerate(parts)}
    return train, val, report


def _check_same(parts, attr: str, what: str) -> None:
    e0, *_, r0 = parts[0]
    for i, (e, _, _, r) in enumerate(parts[1:], start=1):
        if getattr(r, attr) != getattr(r0, attr):
            raise DataError(f"data.mixture[{i}] ({e.name}): its {what} {getattr(r, attr)!r} differ from "
                            f"data.mixture[0] ({e0.name})'s {getattr(r0, attr)!r}; the tasks of a mixture share one "
                            f"objective and head (set label_names or format so that they agree)")


def _merge_kinds(kinds) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in kinds:
        for name, n in k.items():
            out[name] = out.get(name, 0) + n
    return out
