"""Per-sequence log-probabilities of the labelled tokens: log π(y|x) = Σ_t log p(y_t | x, y_<t).

The preference objectives need one number per sequence (its summed log-prob, and its token count), not
the batch's summed cross-entropy. Two ways to compute the same sums:

* ``logits_logps`` (the reference): the model's full logits, ``log_softmax``, the label's entry.
* ``chunked_logps``: the decoder's hidden states, only at the positions whose next token is labelled,
  go through the head a chunk of rows at a time, so the (rows, V) logits are never held for more than
  one chunk. A frozen head (every adapter method) runs ``kernels.cross_entropy.linear_logps``, which
  computes each row's gradient with its log-prob and recomputes nothing in backward; a trained head
  runs each chunk under activation checkpointing.

When the rows carry their CPU copy (``HOST``: ``labels`` and ``sequence``, as the objectives build them
from a batch that ``to_device`` moved), the labelled positions and each sequence's token count are
found on the host and copied ahead, so the step does not wait for the GPU to learn them.

Both take a row batch (``input_ids``, ``labels`` with -100 where ignored, ``attention_mask`` or packed
``position_ids``/``cu_seq_lens_*``) and ``sequence``: for every position of the flattened (R·T) rows, the
index of the sequence it belongs to (padded rows: the row; packed rows: the document), and return
``(sums (S,), counts (S,))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...data.collate import HOST, ahead
from ...kernels.cross_entropy import IGNORE, linear_logps
from .causal_lm import model_inputs, next_token_labels, plain_head

CHUNK_ELEMENTS = 1 << 25   # fp32 logits per chunk (128 MiB)


def row_sequence(labels: torch.Tensor) -> torch.Tensor:
    """(R, T) padded rows -> (R*T,): the sequence of each position is its row."""
    r, t = labels.shape
    return torch.arange(r, device=labels.device).repeat_interleave(t)


def with_host(rows: dict, labels: torch.Tensor | None, sequence: torch.Tensor | None) -> dict:
    """``rows`` with the CPU copies of its ``labels`` and flat ``sequence`` under ``HOST`` (none if either
    is missing: the positions are then found on the device)."""
    if labels is not None and sequence is not None:
        rows[HOST] = {"labels": labels, "sequence": sequence.reshape(-1)}
    return rows


def _labelled(rows: dict, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions whose next token is labelled (K,), their sequences (K,), each sequence's count (n,))."""
    device = rows["labels"].device
    host = rows.get(HOST)
    if host is None:
        keep = (next_token_labels(rows["labels"]) != IGNORE).nonzero().squeeze(1)
        seq = rows["sequence"].index_select(0, keep)
        return keep, seq, torch.bincount(seq, minlength=n)
    keep = (next_token_labels(host["labels"]) != IGNORE).nonzero().squeeze(1)
    seq = host["sequence"].index_select(0, keep)
    return tuple(ahead(t, device) for t in (keep, seq, torch.bincount(seq, minlength=n)))


def _per_sequence(token_logps: torch.Tensor, seq: torch.Tensor, n: int,
                  counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, seq, token_logps)
    counts = torch.bincount(seq, minlength=n) if counts is None else counts
    return sums, counts.to(token_logps.dtype)


def logits_logps(model: nn.Module, rows: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full logits (R, T, V), then each labelled next token's log-prob summed per sequence."""
    logits = model(**model_inputs(rows)).logits                        # (R, T, V)
    targets = next_token_labels(rows["labels"])                        # (R*T,)
    keep = targets != IGNORE
    flat = logits.reshape(-1, logits.shape[-1])[keep].float()          # (K, V)
    token = flat.gather(1, targets[keep][:, None]).squeeze(1) - torch.logsumexp(flat, dim=-1)
    return _per_sequence(token, rows["sequence"][keep], n)


def _chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, w, b).float()                                 # (c, V)
    return logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def chunked_logps(model: nn.Module, rows: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums without the full logits: the head runs on the labelled positions, a chunk at a time."""
    head = plain_head(model)
    if head is None:
        return logits_logps(model, rows, n)
    keep, seq, counts = _labelled(rows, n)                              # (K,), (K,), (n,)
    hidden = model.get_decoder()(**model_inputs(rows)).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (K, d)
    y = next_token_labels(rows["labels"]).index_select(0, keep)
    trained = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    if not trained:
        token = linear_logps(hidden, head.weight, y, head.bias, CHUNK_ELEMENTS)
        return _per_sequence(token, seq, n, counts)
    size = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    parts = []
    for i in range(0, hidden.shape[0], size):
        args = (hidden[i:i + size], head.weight, head.bias, y[i:i + size])
        parts.append(checkpoint(_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*args))
    token = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return _per_sequence(token, seq, n, counts)
