"""Empirical Fisher information and top-k parameter selection (shared by Child-tuning D and FishMask).

The diagonal empirical Fisher of a parameter w over N examples (x_i, y_i) is

    F(w) = 1/N · Σ_i (∂ log p(y_i | x_i) / ∂w)²

(Xu et al. 2021, eq. 4; Sung et al. 2021, eq. 2 with the observed label, their "empirical
Fisher"). Each example's gradient is taken separately (one backward per example), in eval mode
so that dropout does not add noise; ``log p(y_i | x_i)`` is the objective's summed loss of that
example (for a causal LM, the summed token log-likelihood of its supervised tokens).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from ..data.collate import HOST


def split_examples(batch: dict) -> Iterator[dict]:
    """One batch per example, with padding columns removed (and without the batch's CPU copy, which
    holds every example)."""
    key = "input_ids" if "input_ids" in batch else next(k for k in batch if k.endswith("input_ids"))  # pairs
    n, length = batch[key].shape[:2]
    for i in range(n):
        ex = {k: v[i:i + 1] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n else v
              for k, v in batch.items() if k != HOST}
        if "attention_mask" in ex:
            keep = ex["attention_mask"][0].bool()
            ex = {k: v[:, keep] if torch.is_tensor(v) and v.ndim == 2 and v.shape[1] == length
                  and not k.startswith("decoder_") else v  # an encoder-decoder's targets have their own length
                  for k, v in ex.items()}
        yield ex


@contextlib.contextmanager
def _grad_enabled(tensors: Iterable[torch.Tensor], model: nn.Module):
    tensors = list(tensors)
    old = [t.requires_grad for t in tensors]
    was_training = model.training
    model.eval()
    for t in tensors:
        t.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for t, o in zip(tensors, old):
            t.requires_grad_(o)
        model.train(was_training)


def empirical_fisher(model: nn.Module, batches: Iterable[dict], objective, tensors: dict[str, torch.Tensor],
                     max_samples: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal empirical Fisher (fp32) of each tensor in ``tensors`` and the number of examples used.

    ``objective.loss(model, batch)`` returns ``(loss_sum, count, extra)``; its loss_sum on a
    one-example batch is that example's negative log-likelihood.
    """
    names = list(tensors)
    params = [tensors[n] for n in names]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    seen = 0
    with _grad_enabled(params, model):
        for batch in batches:
            for ex in split_examples(batch):
                if max_samples is not None and seen >= max_samples:
                    break
                loss, _, _ = objective.loss(model, ex)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.addcmul_(g.float(), g.float())
                del loss, grads   # freed before the next example's backward, not after it
                seen += 1
            if max_samples is not None and seen >= max_samples:
                break
    if seen == 0:
        raise ValueError("Fisher estimation got no training examples")
    return {n: a.div_(seen) for n, a in zip(names, acc)}, seen


def release_freed() -> None:
    """Give the heap the Fisher pass freed back to the system (glibc's ``malloc_trim``): the training
    step after it then grows its own blocks from the weights up rather than on top of the pass's
    fragments (which glibc keeps resident otherwise)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat int64 positions (sorted) of the ``k`` largest entries over all tensors together.

    The k-th largest value is found first (on the CPU by an in-place selection over one flat fp32 copy,
    4 bytes an entry; ``torch.topk`` there keeps a (value, index) pair of 16 bytes for every entry), then
    each tensor keeps its entries above it and, in order, as many entries equal to it as make k.
    """
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    k = max(0, min(k, total))
    if k == 0:
        return {n: torch.empty(0, dtype=torch.long, device=scores[n].device) for n in names}
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    if flat.device.type == "cpu":
        a = flat.numpy()
        a.partition(total - k)
        thr = float(a[total - k])
    else:
        thr = float(torch.topk(flat, k, sorted=False).values.min())
    del flat
    out, above = {}, {}
    for n in names:
        above[n] = (scores[n].detach().reshape(-1).float() > thr).nonzero().reshape(-1)
    ties = k - sum(v.numel() for v in above.values())
    for n in names:
        idx = above[n]
        if ties > 0:
            eq = (scores[n].detach().reshape(-1).float() == thr).nonzero().reshape(-1)[:ties]
            ties -= eq.numel()
            idx = torch.cat([idx, eq]).sort().values if eq.numel() else idx
        out[n] = idx
    return out


def random_scores(tensors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random scores: their top-k is a uniformly random set of k entries."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=g).to(t.device) for n, t in tensors.items()}


def budget(total: int, fraction: float | None, count: int | None) -> int:
    """Number of entries to keep: ``count`` when given, else ``round(fraction · total)`` (at least 1)."""
    if count is not None:
        return min(count, total)
    return max(1, min(total, round(fraction * total)))
