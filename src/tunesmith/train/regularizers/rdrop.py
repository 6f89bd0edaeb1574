"""R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks", Eq. 3).

Each batch goes through the model twice; dropout makes the two distributions ``P1``, ``P2`` differ. Per item:

    loss = (CE_1 + CE_2) / 2 + α · (KL(P1 ‖ P2) + KL(P2 ‖ P1)) / 2

(the paper sums the two cross-entropies; halving them keeps the loss on the objective's scale). The two
passes cost twice the compute of one; dropout must be on (see ``regularize.dropout``).
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from . import Regularizer, captured_logits, needs_logits, register, scored


def symmetric_kl(logits1, logits2):
    """Σ over items of ``(KL(P1‖P2) + KL(P2‖P1)) / 2``; logits (N, K)."""
    import torch
    lp, lq = torch.log_softmax(logits1, -1), torch.log_softmax(logits2, -1)
    return 0.5 * ((lp.exp() * (lp - lq)).sum() + (lq.exp() * (lq - lp)).sum())


@register
class RDrop(Regularizer):
    summary: ClassVar[str] = "Two dropout passes per batch, symmetric KL between them weighted α (Liang et al. 2021)."
    name: Literal["rdrop"] = "rdrop"
    alpha: float = Field(1.0, gt=0, description="Weight α of the symmetric KL between the two passes.")

    def check(self, train_cfg, objective_cfg) -> None:
        needs_logits(self.name, train_cfg, objective_cfg)

    def wrap_loss(self, loss_fn):
        alpha = self.alpha

        def rdrop(model, batch):
            with captured_logits(model) as first:
                total1, n, extra = loss_fn(model, batch)
            with captured_logits(model) as second:
                total2, _, _ = loss_fn(model, batch)
            l1, _ = scored(first[-1] if first else None, batch, "rdrop")
            l2, _ = scored(second[-1] if second else None, batch, "rdrop")
            return 0.5 * (total1 + total2) + alpha * symmetric_kl(l1, l2), n, extra

        return rdrop
