"""L2 towards the starting weights: λ/2 Σ_i (θ_i - θ*_i)², θ* the trainable weights when training begins
(those of ``init_from``, the previous stage). EWC with every F_i = 1."""
from __future__ import annotations

import torch

from . import Strategy, register, trainable
from .configs.l2 import L2Config


def anchored_penalty(params, anchor, weights=None) -> torch.Tensor:
    """Σ_i w_i (θ_i - θ*_i)² over the tensors (w = 1 when ``weights`` is None)."""
    total = 0.0
    for k, (p, a) in enumerate(zip(params, anchor)):
        d = (p - a).pow(2)
        total = total + (d if weights is None else weights[k] * d).sum()
    return total


@register
class L2(Strategy):
    Config = L2Config

    def prepare(self, model, ctx) -> None:
        self.params = [p for _, p in trainable(model)]
        self.anchor = [p.detach().clone() for p in self.params]
        self.last = 0.0

    def loss(self, model):
        pen = anchored_penalty(self.params, self.anchor)
        self.last = float(pen.detach())
        return 0.5 * self.cfg.lam * pen

    def metrics(self) -> dict:
        return {"l2/sq_distance": self.last}
