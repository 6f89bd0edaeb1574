"""Per-sequence log-probabilities of the labelled tokens: log π(y|x) = Σ_t log p(y_t | x, y_<t).

The preference objectives need one number per sequence (its summed log-prob, and its token count), not
the batch's summed cross-entropy. Two ways to compute the same sums:

* ``logits_logps`` (the reference): the model's full logits, ``log_softmax``, the label's entry.
* ``chunked_logps``: the decoder's hidden states, only at the positions whose next token is labelled,
  go through the head a chunk of rows at a time; each chunk runs under activation checkpointing, so the
  (rows, V) logits are never held for more than one chunk, in forward or in backward.

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

from ...kernels.cross_entropy import IGNORE
from .causal_lm import model_inputs, next_token_labels, plain_head

CHUNK_ELEMENTS = 1 << 25   # fp32 logits per chunk (128 MiB)


def _per_sequence(token_logps: torch.Tensor, seq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, seq, token_logps)
    counts = torch.bincount(seq, minlength=n).to(token_logps.dtype)
    return sums, counts


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
    targets = next_token_labels(rows["labels"])
    keep = (targets != IGNORE).nonzero().squeeze(1)                    # (K,)
    hidden = model.get_decoder()(**model_inputs(rows)).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)  # (K, d)
    y = targets.index_select(0, keep)
    size = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    parts = []
    for i in range(0, hidden.shape[0], size):
        args = (hidden[i:i + size], head.weight, head.bias, y[i:i + size])
        parts.append(checkpoint(_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*args))
    token = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return _per_sequence(token, rows["sequence"].index_select(0, keep), n)
