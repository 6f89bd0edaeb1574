"""The gradient-reversal layer of Ganin et al. 2016 (§3.1): R_λ(x) = x forward, dR/dx = -λ I backward."""
from __future__ import annotations

import torch


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Identity on ``x``; its gradient is multiplied by -λ on the way back."""
    return _Reverse.apply(x, lam)
