"""Per-token log-probabilities (and entropies, and values) of sampled completions under a model.

A rollout micro-batch is right-padded rows of prompt + completion; ``labels`` hold the completion's tokens
and −100 elsewhere, as the preference objectives' rows do (``objectives/_logps.py``), so the same route
serves: the decoder's hidden states at the positions that predict a completion token go through the head a
chunk at a time (under activation checkpointing while training, so the (K, V) logits of the whole batch are
never held), with the logits divided by the sampling temperature. Models whose head is not a plain linear
layer use the full logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...kernels.cross_entropy import IGNORE
from ..objectives._logps import CHUNK_ELEMENTS
from ..objectives.causal_lm import model_inputs, next_token_labels, plain_head


def rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> dict:
    """Right-padded (N, L) input_ids / attention_mask / labels of prompt + completion, and the completion
    mask (N, T) (T: the longest completion)."""
    n = len(prompts)
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    width = max(1, max(len(c) for c in completions))
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    cmask = torch.zeros((n, width), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = p + c
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        if c:
            labels[i, len(p):len(seq)] = torch.tensor(c)
        cmask[i, :len(c)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {**{k: v.to(device) for k, v in out.items()}, "completion_mask": cmask.to(device)}


def _chunk(h, w, b, y, temperature: float):
    logits = F.linear(h, w, b).float() / temperature                  # (c, V)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, y[:, None]).squeeze(1) - lse
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs * logits).sum(-1)
    return logp, entropy


def _scatter(values: torch.Tensor, cmask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(cmask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(cmask.bool(), values) if values.numel() else out


def token_logps(model: nn.Module, batch: dict, temperature: float = 1.0, value_head: nn.Module | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp, entropy, values), each (N, T) over the completion positions (0 past each completion's end):
    log π(o_t | q, o_<t) of the tempered distribution, its entropy (detached), and ``value_head`` of the
    hidden state that predicts o_t (PPO's V_t), None without one."""
    head = plain_head(model)
    targets = next_token_labels(batch["labels"])
    keep = (targets != IGNORE).nonzero().squeeze(1)                    # (K,) in row-major order
    y = targets.index_select(0, keep)
    cmask = batch["completion_mask"]
    if head is None:
        out = model(**model_inputs(batch), output_hidden_states=value_head is not None)
        logits = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, keep).float() / temperature
        lse = torch.logsumexp(logits, -1)
        logp = logits.gather(1, y[:, None]).squeeze(1) - lse
        entropy = (lse - (torch.softmax(logits, -1) * logits).sum(-1)).detach()
        hidden = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1]).index_select(0, keep) \
            if value_head is not None else None
    else:
        hidden = model.get_decoder()(**model_inputs(batch)).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)          # (K, d)
        size = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
        parts = []
        for i in range(0, hidden.shape[0], size):
            args = (hidden[i:i + size], head.weight, head.bias, y[i:i + size], temperature)
            parts.append(checkpoint(_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*args))
        logp = torch.cat([p[0] for p in parts]) if parts else hidden.new_zeros(0, dtype=torch.float32)
        entropy = torch.cat([p[1] for p in parts]) if parts else logp.detach()
    values = None
    if value_head is not None:
        values = _scatter(value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float(), cmask)
    return _scatter(logp, cmask), _scatter(entropy, cmask), values
