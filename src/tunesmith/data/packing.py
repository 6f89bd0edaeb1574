"""Padding-free packed batches for SFT: whole examples laid end to end in one row, no pad tokens.

``pack_groups`` draws the example order from (seed, epoch) like ``batch_indices`` and fills each
group greedily up to ``max_tokens``. ``collate_packed`` turns a group into one row of shape (1, N)
with what document-masked attention needs:

* ``position_ids`` restart at 0 for every document (RoPE sees each document as if alone);
* ``cu_seq_lens_q`` / ``cu_seq_lens_k``: int32 cumulative lengths [0, n1, n1 + n2, ..., N] and
  ``max_length_q`` / ``max_length_k`` (transformers' flash-attention kwargs; ``kernels.attention`` reads them);
* ``labels`` with each document's first label ignored, so no token learns to predict the next document.

No ``attention_mask`` is produced: with an attention backend that ignores cu_seq_lens, transformers
derives the document mask from the restarting ``position_ids``; under ``kernels.attention`` (what
``train.padding_free`` enables) no mask is built at all.
"""
from __future__ import annotations

from typing import Any

import torch

from .collate import IGNORE, on_host


def pack_groups(lengths: list[int], max_tokens: int, *, seed: int, epoch: int, shuffle: bool = True
                ) -> list[list[int]]:
    """Groups of example indices, each at most ``max_tokens`` long in total (longer examples alone)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    n = len(lengths)
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
             if shuffle else list(range(n)))
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        groups.append(current)
    return groups


def example_tokens(example: dict[str, Any]) -> int:
    """Tokens an example takes in a packed row (a preference pair: chosen + rejected)."""
    return sum(len(v) for k, v in example.items() if k.endswith("input_ids"))


def collate_packed_pairs(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor | int]:
    """Preference pairs -> one packed row: chosen_0, rejected_0, chosen_1, … as documents, with ``sequence``
    (1, N): each position's sequence, chosen i as i and rejected i as B + i (the order of a padded pair
    batch), ``pairs`` = B, and the pairs' scalar fields (reference log-probs, margins) as (B,) tensors."""
    b = len(examples)
    docs = [{"input_ids": ex[f"{side}_input_ids"], "labels": ex[f"{side}_labels"]}
            for ex in examples for side in ("chosen", "rejected")]
    out = collate_packed(docs)
    seq = [i + b * s for i in range(b) for s in (0, 1)]             # document order -> sequence index
    lens = [len(d["input_ids"]) for d in docs]
    out["sequence"] = torch.repeat_interleave(torch.tensor(seq), torch.tensor(lens))[None]   # (1, N)
    out["pairs"] = b
    for key, value in examples[0].items():
        if isinstance(value, float):
            out[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)      # (B,)
    return out


def collate_packed(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor | int]:
    """Examples with ``input_ids`` and ``labels`` -> one packed row (see module docstring); preference
    pairs go through :func:`collate_packed_pairs`."""
    if not examples:
        raise ValueError("collate_packed got an empty list of examples")
    if "chosen_input_ids" in examples[0]:
        return collate_packed_pairs(examples)
    ids, labels, pos, lens = [], [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        if n == 0:
            continue
        ids.extend(ex["input_ids"])
        lab = list(ex.get("labels", ex["input_ids"]))
        lab[0] = IGNORE
        labels.extend(lab)
        pos.extend(range(n))
        lens.append(n)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    longest = max(lens)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),      # (1, N)
        "labels": torch.tensor([labels], dtype=torch.long),      # (1, N)
        "position_ids": torch.tensor([pos], dtype=torch.long),   # (1, N)
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,                # (docs + 1,)
        "max_length_q": longest, "max_length_k": longest,
    }


def real_tokens(batch: dict) -> int:
    """Non-pad tokens of a padded or packed batch (counted on the batch's CPU copy where it has one)."""
    masks = [k for k in batch if k.endswith("attention_mask")]   # chosen_ and rejected_ ones of pair batches
    if masks:
        return sum(int(on_host(batch, k).sum()) for k in masks)
    return int(batch["input_ids"].numel()) if "input_ids" in batch else 0
