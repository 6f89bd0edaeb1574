"""Tokenize UltraFeedback preference pairs once, on the CPU, for bench/gpu_dpo.py.

Runs tunesmith's own preference data path (chat template, prompt shared and masked, ``max_seq_len``
per side) with the embedded SmolLM2 tokenizer (its ids fit the Llama-3 vocabulary; no Llama-3
tokenizer is available offline). Writes ``.benchdata/ufb_pairs.npz``: for each side (chosen,
rejected) the flat token ids, a flat "label is kept" mask and per-pair offsets. The GPU machine
reads only that file.

    python bench/gpu_prepare_ufb.py [--rows 200] [--max-seq-len 1024]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tunesmith.data import build_datasets
from tunesmith.data.config import DataConfig
from tunesmith.models.loader import ModelConfig, load_tokenizer

SRC = "/work/shared/data/ultrafeedback_binarized_subset/train_prefs.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--src", default=SRC)
    ap.add_argument("--out", default=".benchdata/ufb_pairs.npz")
    args = ap.parse_args()
    tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m", device="cpu"))
    train, _, report = build_datasets(DataConfig(train=args.src, max_rows=args.rows, val_split=0.0, on_error="skip"), tok,
                                      max_seq_len=args.max_seq_len, objective="dpo", seed=0)
    out = {}
    for side in ("chosen", "rejected"):
        ids = [ex[f"{side}_input_ids"] for ex in train.examples]
        keep = [[int(lab != -100) for lab in ex[f"{side}_labels"]] for ex in train.examples]
        out[f"{side}_ids"] = np.concatenate(ids).astype(np.uint16)
        out[f"{side}_keep"] = np.concatenate(keep).astype(np.uint8)
        out[f"{side}_offsets"] = np.cumsum([0] + [len(x) for x in ids]).astype(np.int64)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, pad_id=np.int64(tok.pad_token_id), **out)
    lens = np.diff(out["chosen_offsets"]) + np.diff(out["rejected_offsets"])
    print(f"{len(train.examples)} pairs ({report.skipped} skipped), {lens.sum()} tokens (chosen + rejected), "
          f"mean {lens.mean():.0f} a pair, max {lens.max()} -> {args.out}")


if __name__ == "__main__":
    main()
