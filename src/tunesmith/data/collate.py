"""Batching: padding collate and deterministic, resumable batch order.

torch is imported inside the functions, so ``tunesmith.data`` (whose ``collate`` is the function
here) loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE = -100
#: Key of the CPU copy of a batch that ``to_device`` keeps beside the device tensors. Counts (label
#: tokens, real tokens) and the rows a loss reads come from it, so a training step never waits for
#: the GPU to learn them.
HOST = "host"


def pad_id_for(tokenizer) -> int:
    """Padding id: ``pad_token_id``, else ``eos_token_id``, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    import torch
    out = torch.full((len(rows), length), value, dtype=torch.long)  # [B, T]
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate(examples: list[dict[str, Any]], pad_id: int, *, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors.

    ``*input_ids`` are padded with ``pad_id`` and get a matching ``*attention_mask``;
    ``*labels`` are padded with -100; ``label`` becomes a LongTensor ``[B]``; any other list
    key is padded with 0. ``chosen_*`` and ``rejected_*`` share one length so they can be
    concatenated into one batch. Lengths are rounded up to ``pad_to_multiple_of``.
    """
    import torch
    if not examples:
        raise ValueError("collate got an empty list of examples")
    keys = list(examples[0])
    groups: dict[str, int] = {}  # prefix ("", "chosen_", "rejected_") -> padded length
    for key in keys:
        if isinstance(examples[0][key], list):
            prefix = _prefix(key)
            groups[prefix] = max(groups.get(prefix, 0), max(len(ex[key]) for ex in examples))
    if "chosen_" in groups and "rejected_" in groups:
        groups["chosen_"] = groups["rejected_"] = max(groups["chosen_"], groups["rejected_"])
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [ex[key] for ex in examples]
        if not isinstance(values[0], list):   # [B]: labels as long, scores (margins, reference log-probs) as float
            batch[key] = torch.as_tensor(values, dtype=torch.float32 if isinstance(values[0], float) else torch.long)
            continue
        prefix = _prefix(key)
        length = _round_up(groups[prefix], pad_to_multiple_of)
        if key.endswith("input_ids"):
            batch[key] = _pad(values, length, pad_id)
            mask = [[1] * len(v) for v in values]
            batch[prefix + "attention_mask"] = _pad(mask, length, 0)
        elif key.endswith("labels"):
            batch[key] = _pad(values, length, IGNORE)
        else:
            batch[key] = _pad(values, length, 0)
    return batch


def _prefix(key: str) -> str:
    for prefix in ("chosen_", "rejected_", "decoder_", "kl_"):
        if key.startswith(prefix):
            return prefix
    return ""


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = False) -> list[list[int]]:
    """Batches of indices into a dataset of ``n`` examples for one epoch.

    The order depends only on ``(seed, epoch)`` (``torch.randperm`` with a generator seeded
    ``seed + epoch``), so a resumed run can skip exactly the first k batches of an epoch.
    Every index appears exactly once, except the tail dropped by ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        import torch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch``'s tensors on ``device``, and the CPU batch itself under ``HOST``."""
    import torch
    host = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items() if k != HOST}
    out[HOST] = host
    return out


def ahead(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without making the host wait: on CUDA through pinned memory (a copy
    from pageable memory synchronises the stream, which would stall the host behind the work queued)."""
    import torch
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def on_host(batch: dict, key: str) -> torch.Tensor:
    """``batch[key]`` as the CPU copy ``to_device`` kept, or as it is where there is none."""
    host = batch.get(HOST)
    return host[key] if host is not None and key in host else batch[key]
