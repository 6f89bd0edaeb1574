"""Writes the summarization files that examples/summarize_dolly.yaml trains and `tunesmith eval` scores.

From the ``summarization`` rows of databricks-dolly-15k (a folder with train.jsonl and test.jsonl,
alpaca-style rows instruction / input / output / category, e.g. ../shared/data/dolly15k; CC BY-SA 3.0)
it writes, to OUT (outside the repository):

- ``train.jsonl``: the training rows (alpaca: instruction, input = the paragraph, output = the summary);
- ``held_out.jsonl``: the held-out rows, the test file's summarization rows and then ``--held-out`` − those
  drawn from train (seeded), which the run validates on and `tunesmith eval` scores.

The split is bench/summarization.py's (same seed, same rows), so the two measure the same held-out set.

    python examples/make_summarization_data.py ../shared/data/dolly15k /tmp/dolly-summarization
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def summarization_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if row.get("category") != "summarization":
            continue
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise SystemExit(f"{path}:{n}: summarization row without a text {missing[0]!r}")
        rows.append({"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]})
    return rows


def split(train: list[dict], test: list[dict], held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    k = max(0, held_out - len(test))
    return [train[i] for i in order[k:]], (test + [train[i] for i in order[:k]])[:held_out]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="the dolly15k folder (train.jsonl, test.jsonl)")
    p.add_argument("out", type=Path, help="folder to write train.jsonl and held_out.jsonl to")
    p.add_argument("--held-out", type=int, default=30, help="held-out rows (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw from train (default 0)")
    args = p.parse_args(argv)
    for name in ("train.jsonl", "test.jsonl"):
        if not (args.data / name).is_file():
            raise SystemExit(f"{args.data}: no {name} (expected the dolly15k folder: train.jsonl, test.jsonl)")
    train, held = split(summarization_rows(args.data / "train.jsonl"), summarization_rows(args.data / "test.jsonl"),
                        args.held_out, args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "held_out.jsonl", held)
    print(f"wrote {len(train)} rows to {args.out / 'train.jsonl'} and {len(held)} to {args.out / 'held_out.jsonl'}")


if __name__ == "__main__":
    main()
