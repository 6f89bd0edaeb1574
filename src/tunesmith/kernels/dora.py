"""DoRA forward without the dense W0 + s·B A matrix (Liu et al. 2024, eq. 5, norm detached as in §4.3):

    y = m / ||W0 + s·B A||_row ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b

The row norms come from the expansion
    ||W0_i + s (B A)_i||² = ||W0_i||² + 2s Σ_k B_ik (W0 Aᵀ)_ik + s² B_i (A Aᵀ) B_iᵀ,
which reads W0 once (the (d_out, r) product W0 Aᵀ) instead of writing and reading a dense fp32
(d_out, d_in) matrix; ||W0_i||² is constant and may be passed in (``weight_sq``) once computed.
The linear part is ``kernels.lora.lora_linear`` (fused LoRA); the magnitude's gradient flows
through one elementwise scale. Reference: ``dora_linear_reference`` (the dense formula).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import Dequantized, lora_linear
from .ops import define


def _dense(weight) -> torch.Tensor:
    return weight.get() if isinstance(weight, Dequantized) else weight


def weight_sq_norm(weight) -> torch.Tensor:
    """||W0_i||² per output row, fp32, shape (d_out,)."""
    w = _dense(weight)
    return torch.linalg.vector_norm(w, dim=1, dtype=torch.promote_types(w.dtype, torch.float32)).square()


@torch.no_grad()
def dora_norm(weight, a: torch.Tensor, b: torch.Tensor, scaling: float,
              weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||W0 + s·B A|| per output row (fp32, no gradient), shape (d_out,):
    ||W0_i||² + Σ_k B_ik (2s (W0 Aᵀ) + s² B A Aᵀ)_ik, in few kernels (once per projection and step)."""
    w = _dense(weight)
    acc = torch.promote_types(w.dtype, torch.float32)
    af, bf = a.to(acc), b.to(acc)
    wa = torch.mm(w, a.t().to(w.dtype)).to(acc)                                        # (d_out, r)
    m = torch.addmm(wa, bf, torch.mm(af, af.t()), beta=2 * scaling, alpha=scaling * scaling)  # (d_out, r)
    w2 = weight_sq_norm(w) if weight_sq is None else weight_sq
    norm = (torch.linalg.vecdot(bf, m) + w2).clamp_min(0).sqrt()
    # compiled, the (d_out,) result is marked so that a checkpointed block keeps it instead of reading
    # W0 again to recompute it in backward (kernels/compile.py, SMALL_OPS)
    return kept(norm) if torch.compiler.is_compiling() else norm


#: Identity (a copy, gradients pass through): marks a result that compiled checkpointed blocks keep for
#: backward instead of recomputing it.
kept = define("kept(Tensor t) -> Tensor", lambda t: t.clone(), lambda t: torch.empty_like(t),
              backward=lambda ctx, g: g)


def dora_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                magnitude: torch.Tensor, scaling: float, weight_sq: torch.Tensor | None = None,
                keep_output: bool = False) -> torch.Tensor:
    """DoRA layer output for x (..., d_in); gradients flow to x, A, B and the magnitude.

    The magnitude's gradient reads the linear part's output. ``keep_output`` (compiled only): a
    checkpointed block keeps that output instead of recomputing its GEMM in backward; set on a block's
    last projection, whose output nothing else in backward needs (kernels/compile.py)."""
    scale = magnitude / dora_norm(weight, a, b, scaling, weight_sq)  # (d_out,)
    lin = lora_linear(x, weight, None, a, b, scaling)              # (..., d_out)
    if keep_output and torch.compiler.is_compiling():
        lin = kept(lin)
    y = lin * scale.to(lin.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def dora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """Dense formula, as peft computes it: base(x) + (m/n - 1)·x W0ᵀ + (m/n)·s·x Aᵀ Bᵀ, n detached."""
    with torch.no_grad():
        norm = torch.linalg.norm(weight.to(a.dtype) + scaling * (b @ a), dim=1)
    scale = magnitude / norm
    base = F.linear(x, weight)
    y = base if bias is None else base + bias
    return y + ((scale - 1) * base.to(a.dtype) + scale * F.linear(F.linear(x.to(a.dtype), a), b) * scaling).to(y.dtype)
