"""Direct preference optimisation and its family, as pure functions of per-sequence log-probabilities.

With h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)] (the chosen response's
log-ratio minus the rejected one's):

* ``sigmoid`` — DPO (Rafailov et al. 2023, eq. 7): L = −log σ(β h); with label smoothing ε, conservative
  DPO (Mitchell 2023): L = −(1−ε) log σ(β h) − ε log σ(−β h).
* ``robust`` — robust DPO (Chowdhury et al. 2024, eq. 8): L = [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε).
* ``hinge`` — SLiC (Zhao et al. 2023): L = max(0, 1 − β h).
* ``ipo`` — IPO (Azar et al. 2023, eq. 17): L = (h̄ − 1/(2β))², with h̄ the log-ratios averaged over each
  response's tokens (the length-normalised form TRL uses, confirmed with the IPO authors).
* RPO (Pang et al. 2024): ``rpo_alpha`` α adds α · NLL of the chosen responses (mean over their tokens in
  the batch) to every pair's loss.

The implicit rewards are r = β (log π − log π_ref) of each response.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._preference import PairObjective, reward_extras
from .configs.dpo import DPOConfig


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             rpo_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the chosen and rejected rewards (B,) from summed log-probs (B,) of the policy
    and the reference (``*_tokens``: each response's token count, for ipo and RPO)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        mean_h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if rpo_alpha:
        losses = losses + rpo_alpha * (-chosen.sum() / chosen_tokens.sum().clamp(min=1))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@register
class DPO(PairObjective):
    Config = DPOConfig

    def pair_loss(self, chosen, rejected, chosen_tokens, rejected_tokens, ref):
        c = self.cfg
        losses, rc, rr = dpo_loss(chosen, rejected, *ref, beta=c.beta, loss_type=c.loss_type,
                                  label_smoothing=c.label_smoothing, chosen_tokens=chosen_tokens,
                                  rejected_tokens=rejected_tokens, rpo_alpha=c.rpo_alpha)
        return losses, reward_extras(rc, rr, chosen, rejected)
