"""How many rows each data.truncation policy keeps whole, truncates or drops (CPU, tokenizer only).

    python bench/data_truncation.py --train /work/shared/data/dolly15k/train.jsonl \
        --validation /work/shared/data/dolly15k/test.jsonl --rows 300 --max-seq-len 256

For every policy it builds the SFT data exactly as a run would (the model's tokenizer and chat
template, data.max_rows, train.max_seq_len) and counts, per split, the examples kept, the rows
truncated, the rows dropped because no response token was left, and the examples whose response is
whole (its trained tokens end with the end-of-turn token). ``right`` is the plain
``ids[:max_seq_len]`` cut. Results go to bench/results/data_truncation.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunesmith.data import DataConfig, build_datasets
from tunesmith.data.chat import IGNORE, eos_id
from tunesmith.data.truncate import POLICIES
from tunesmith.models.loader import ModelConfig, load_tokenizer


def whole_answers(ds, eos: int) -> int:
    """Examples whose trained tokens end with the end-of-turn token: the response was not cut short."""
    return sum(1 for ex in ds if [t for t in ex["labels"] if t != IGNORE][-1:] == [eos])


def split_counts(path: str, rows: int | None, tokenizer, policy: str, max_seq_len: int) -> dict:
    cfg = DataConfig(train=path, max_rows=rows, truncation=policy, on_error="skip", val_split=0.0)
    ds, _, report = build_datasets(cfg, tokenizer, max_seq_len=max_seq_len, objective="sft", seed=0)
    return {"rows": report.rows_read, "kept": len(ds), "truncated": report.truncated,
            "dropped": report.skipped, "dropped_kinds": report.skipped_kinds,
            "whole_answers": whole_answers(ds, eos_id(tokenizer))}


def measure(args, tokenizer, policy: str) -> dict:
    return {"policy": policy,
            "train": split_counts(args.train, args.rows, tokenizer, policy, args.max_seq_len),
            "validation": split_counts(args.validation, None, tokenizer, policy, args.max_seq_len)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", default="/work/shared/data/dolly15k/train.jsonl")
    p.add_argument("--validation", default="/work/shared/data/dolly15k/test.jsonl")
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_truncation.json"))
    args = p.parse_args()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=args.model))
    rows = [measure(args, tokenizer, policy) for policy in POLICIES]
    result = {"train": args.train, "validation": args.validation, "rows": args.rows,
              "max_seq_len": args.max_seq_len, "model": args.model, "policies": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        t, v = r["train"], r["validation"]
        print(f"{r['policy']:>6}: train {t['rows']} rows: {t['truncated']} truncated, {t['dropped']} dropped, "
              f"{t['whole_answers']} whole answers; validation {v['rows']} rows: {v['truncated']} truncated, "
              f"{v['dropped']} dropped, {v['whole_answers']} whole answers")


if __name__ == "__main__":
    main()
