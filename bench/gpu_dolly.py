"""Dolly 15k SFT batches for bench/gpu_train.py: padded (dynamic padding to the longest example of
each batch) or padding-free packed (tunesmith.data.packing), from .benchdata/dolly_sft.npz
(written by bench/gpu_prepare_dolly.py). Throughput counts real (non-pad) tokens only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tunesmith.data import collate
from tunesmith.data.packing import collate_packed, pack_groups

DATA = Path(__file__).resolve().parents[1] / ".benchdata" / "dolly_sft.npz"


def examples(max_len: int, vocab: int) -> list[dict]:
    z = np.load(DATA)
    ids, keep, off = z["ids"].astype(np.int64) % vocab, z["keep"].astype(bool), z["offsets"]
    out = []
    for s, e in zip(off[:-1], off[1:]):
        x = ids[s:e][:max_len]
        lab = np.where(keep[s:e][:max_len], x, -100)
        out.append({"input_ids": x.tolist(), "labels": lab.tolist()})
    return out


def to_cuda(batch: dict) -> dict:
    """``batch`` as tunesmith's training loop hands it over (``to_device``: with its CPU copy)."""
    from gpu_common import DEV
    from tunesmith.data.collate import to_device
    return to_device(batch, torch.device(DEV))


def batches(kind: str, size: int, max_len: int, vocab: int, n: int = 11, seed: int = 0) -> list[dict]:
    """``kind`` padded: ``size`` examples a batch; packed: up to ``size`` tokens a batch."""
    ex = examples(max_len, vocab)
    if kind == "padded":
        order = torch.randperm(len(ex), generator=torch.Generator().manual_seed(seed)).tolist()
        groups = [order[i:i + size] for i in range(0, size * n, size)]
        return [to_cuda(collate([ex[i] for i in g], pad_id=0)) for g in groups]
    groups = pack_groups([len(e["input_ids"]) for e in ex], size, seed=seed, epoch=0)[:n]
    return [to_cuda(collate_packed([ex[i] for i in g])) for g in groups]


@torch.no_grad()
def packing_check(model, packed: dict, per_batch: int = 4) -> float:
    """|packed loss sum - padded loss sum| / padded, over the documents of one packed batch."""
    from tunesmith.train.objectives.causal_lm import CausalLM
    obj = CausalLM()
    cu = packed["cu_seq_lens_q"].tolist()
    ids, labels = packed["input_ids"][0], packed["labels"][0]
    docs = [{"input_ids": ids[s:e].tolist(), "labels": labels[s:e].tolist()} for s, e in zip(cu[:-1], cu[1:])]
    from gpu_common import DEV
    with torch.autocast(DEV, dtype=torch.bfloat16):
        want = sum(float(obj.lm_loss(model, to_cuda(collate(docs[i:i + per_batch], pad_id=0))))
                   for i in range(0, len(docs), per_batch))
        got = float(obj.lm_loss(model, packed))
    return abs(got - want) / abs(want)
