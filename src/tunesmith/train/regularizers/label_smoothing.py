"""Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture", §7).

The target of each scored item is ``(1 - ε)`` on its label plus ``ε / K`` on every one of the ``K`` classes
(tokens of the vocabulary for a causal LM), so with ``log p = log_softmax(z)``:

    loss = (1 - ε) · (-log p_y) + ε · mean_k (-log p_k)

which is ``torch.nn.functional.cross_entropy(..., label_smoothing=ε)``. The objective's own summed loss is
the first term; the second is computed from the logits of the same forward pass. Training only.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from . import Regularizer, captured_logits, needs_logits, register, scored


def smoothing_term(logits, targets):
    """Σ over items of ``mean_k -log_softmax(logits)_k``; logits (N, K)."""
    import torch
    del targets
    return -torch.log_softmax(logits, dim=-1).mean(-1).sum()


@register
class LabelSmoothing(Regularizer):
    summary: ClassVar[str] = "Smoothed cross-entropy: (1-ε)·CE + ε·mean over classes of -log p (Szegedy et al. 2016)."
    name: Literal["label_smoothing"] = "label_smoothing"
    epsilon: float = Field(0.1, gt=0, lt=1, description="Smoothing ε: the share of each target spread evenly "
                                                        "over all classes (or vocabulary tokens).")

    def check(self, train_cfg, objective_cfg) -> None:
        needs_logits(self.name, train_cfg, objective_cfg)

    def wrap_loss(self, loss_fn):
        eps = self.epsilon

        def smoothed(model, batch):
            with captured_logits(model) as seen:
                total, n, extra = loss_fn(model, batch)
            logits, targets = scored(seen[-1] if seen else None, batch, "label_smoothing")
            return (1 - eps) * total + eps * smoothing_term(logits, targets), n, extra

        return smoothed
