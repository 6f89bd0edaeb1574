"""How per-row LoRA factors join a base matmul (:class:`.adapters.MultiLoraLinear` and the decode
groups of :mod:`.shared_input`).

For a batch whose row b uses adapter slot s_b, with every loaded adapter's factors side by side,
A_cat (C, d_in) and B_cat (d_out, C), and ``M[b, c] = col_scale[c] · [col_slot[c] == s_b]``:

    y = W0 x + ((x A_catᵀ) ⊙ M) B_catᵀ,

each row's own W0 x + s_a B_a A_a x (Hu et al. 2021, eq. 3), whatever the number of adapters and
with no gather of per-row weights. A_cat joins the base weight as rows, ``W = [W0; A_cat]``
(d_out + C, d_in), so one matmul gives W0 x and x A_catᵀ together (the skinny x A_catᵀ alone would
be a latency-bound matmul of its own); B_cat stays apart, and the masked h goes through one matmul
h B_catᵀ whose sum with W0 x the compiler fuses into what reads it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def join(w0: torch.Tensor, a_cat: torch.Tensor) -> torch.Tensor:
    """W = [W0; A_cat] (d_out + C, d_in); the layer's weight is the view ``W[:d_out]``."""
    return torch.cat([w0, a_cat], dim=0)


def mask(rows: torch.Tensor, col_slot: torch.Tensor, col_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """M (B, C): each column's scale where it belongs to the row's adapter slot, else 0."""
    return (rows[:, None] == col_slot).to(dtype) * col_scale


def product(x: torch.Tensor, w: torch.Tensor, b_cat: torch.Tensor, m: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """y (B, T, d_out) for x (B, T, d_in), every row with its own adapter (``m`` from :func:`mask`)."""
    d_out = b_cat.shape[0]
    y = F.linear(x, w)                                              # (B, T, d_out + C): W0 x and x A_catᵀ
    out = y[..., :d_out] + F.linear(y[..., d_out:] * m.unsqueeze(1), b_cat)
    return out if bias is None else out + bias
