"""Derive the datasets of examples/continual_*.yaml and examples/dann_sst2_length.yaml from ../shared/data.

    python examples/make_strategy_data.py [--shared ../shared/data] [--out runs/strategy-data]

- continual task A, ``sst2_a``: 2,000 SST-2 training rows (seeded sample), SST-2's validation file as its test;
- continual task B, ``dolly_bq``: Dolly-15k instructions labelled 1 for category brainstorming and 0 for
  open_qa, balanced, 800 for training and 200 held out (label 1 means "positive" in A and "brainstorming"
  in B: one binary head, two tasks);
- domains of SST-2 by length: source = training rows of 4 to 10 words (2,000, labelled), target = training
  rows of at least 20 words (2,000, labels dropped: what DANN trains on), evaluated on SST-2's validation
  sentences of at most 12 words (source test) and of at least 20 (target test);
- domain text for continued pre-training, ``dolly_context_text``: the reference passages (``input``) of
  Dolly's closed_qa rows, one document each, and ``dolly_closed_qa``: those rows as alpaca for the SFT
  stage after it (examples/domain_pt_sft.yaml).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="runs/strategy-data")
    args = ap.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sst_train = read(shared / "sst2" / "train.jsonl")
    sst_val = read(shared / "sst2" / "validation.jsonl")
    words = lambda r: len(r["text"].split())  # noqa: E731

    a = rng.sample(sst_train, 2000)
    write(out / "sst2_a_train.jsonl", [{"text": r["text"], "label": r["label"]} for r in a])
    write(out / "sst2_a_val.jsonl", [{"text": r["text"], "label": r["label"]} for r in sst_val])

    dolly = read(shared / "dolly15k" / "train.jsonl")
    pos = [r for r in dolly if r["category"] == "brainstorming"]
    neg = [r for r in dolly if r["category"] == "open_qa"]
    rng.shuffle(pos)
    rng.shuffle(neg)
    rows = [{"text": r["instruction"], "label": 1} for r in pos[:500]] + \
           [{"text": r["instruction"], "label": 0} for r in neg[:500]]
    rng.shuffle(rows)
    write(out / "dolly_bq_train.jsonl", rows[:800])
    write(out / "dolly_bq_val.jsonl", rows[800:])

    short = [r for r in sst_train if 4 <= words(r) <= 10]
    long = [r for r in sst_train if words(r) >= 20]
    write(out / "sst2_short_train.jsonl", [{"text": r["text"], "label": r["label"]} for r in rng.sample(short, 2000)])
    write(out / "sst2_long_unlabelled.jsonl", [{"text": r["text"]} for r in rng.sample(long, 2000)])
    write(out / "sst2_short_val.jsonl", [{"text": r["text"], "label": r["label"]} for r in sst_val if words(r) <= 12])
    write(out / "sst2_long_val.jsonl", [{"text": r["text"], "label": r["label"]} for r in sst_val if words(r) >= 20])

    closed = [r for r in dolly if r["category"] == "closed_qa" and r["input"].strip()]
    write(out / "dolly_context_text.jsonl", [{"text": r["input"]} for r in closed])
    write(out / "dolly_closed_qa.jsonl", [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
                                          for r in closed])


if __name__ == "__main__":
    main()
