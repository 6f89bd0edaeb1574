"""Tokenize Dolly 15k once, on the CPU, for bench/gpu_train.py's real-data configuration.

Runs tunesmith's own SFT data path (alpaca format, chat template, prompt tokens masked) with the
embedded SmolLM2 tokenizer (no Llama-3 tokenizer is available offline; its ids fit the Llama-3
vocabulary, and token counts are of the same order). Writes .benchdata/dolly_sft.npz: the flat token
ids (uint16), a flat "label is kept" mask and per-example offsets. The GPU machine reads only that.

    python bench/gpu_prepare_dolly.py [--rows 4000]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tunesmith.data import build_datasets
from tunesmith.data.config import DataConfig
from tunesmith.models.loader import ModelConfig, load_tokenizer

SRC = "/work/shared/data/dolly15k/train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--out", default=".benchdata/dolly_sft.npz")
    args = ap.parse_args()
    tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m", device="cpu"))
    train, _, report = build_datasets(DataConfig(train=SRC, max_rows=args.rows, val_split=0.0), tok,
                                      max_seq_len=args.max_seq_len, objective="sft", seed=0)
    ids = [ex["input_ids"] for ex in train.examples]
    keep = [[int(lab != -100) for lab in ex["labels"]] for ex in train.examples]
    offsets = np.cumsum([0] + [len(x) for x in ids])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, ids=np.concatenate(ids).astype(np.uint16),
                        keep=np.concatenate(keep).astype(np.uint8), offsets=offsets.astype(np.int64))
    lens = np.diff(offsets)
    print(f"{len(ids)} examples ({report.skipped} skipped), {offsets[-1]} tokens, mean {lens.mean():.0f}, "
          f"max {lens.max()}, label tokens {np.concatenate(keep).mean():.2f} of all -> {args.out}")


if __name__ == "__main__":
    main()
