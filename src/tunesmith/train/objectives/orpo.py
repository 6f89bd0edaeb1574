"""ORPO, odds-ratio preference optimisation (Hong et al. 2024), reference-free.

With P(y|x) = exp(mean token log-prob of y) and odds(y|x) = P / (1 − P) (eqs. 4, 7):

    L = L_SFT − λ · log σ( log odds(y_w|x) − log odds(y_l|x) )

where L_SFT is the NLL of the chosen responses (the mean over their tokens in the batch) and
log odds = log P − log(1 − P), computed as ℓ − log(1 − e^ℓ) from the mean log-prob ℓ. The rewards logged
are λ · ℓ of each response (as TRL).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._preference import PairObjective, reward_extras
from .configs.orpo import ORPOConfig


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, *, beta: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and rewards from summed log-probs (B,) and token counts (B,) of each response."""
    mc = chosen.float() / chosen_tokens.clamp(min=1)          # ℓ_w: mean token log-prob
    mr = rejected.float() / rejected_tokens.clamp(min=1)
    log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
    nll = -chosen.sum() / chosen_tokens.sum().clamp(min=1)
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses, beta * mc.detach(), beta * mr.detach()


@register
class ORPO(PairObjective):
    Config = ORPOConfig
    reference_free = True

    def pair_loss(self, chosen, rejected, chosen_tokens, rejected_tokens, ref):
        losses, rc, rr = orpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, beta=self.cfg.beta)
        return losses, reward_extras(rc, rr, chosen, rejected)
