"""SimPO, simple preference optimisation (Meng et al. 2024, eq. 6), reference-free.

The reward is the length-normalised log-prob, r(x, y) = β/|y| · log π(y|x), and the loss asks the chosen
response's reward to beat the rejected one's by a target margin γ:

    L = −log σ( β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ )
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._preference import PairObjective, reward_extras
from .configs.simpo import SimPOConfig


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, *, beta: float = 2.0, gamma: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and rewards β·mean log-prob from summed log-probs and token counts (B,)."""
    rc = beta * chosen / chosen_tokens.clamp(min=1)
    rr = beta * rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(rc - rr - gamma), rc.detach(), rr.detach()


@register
class SimPO(PairObjective):
    Config = SimPOConfig
    reference_free = True

    def pair_loss(self, chosen, rejected, chosen_tokens, rejected_tokens, ref):
        losses, rc, rr = simpo_loss(chosen, rejected, chosen_tokens, rejected_tokens, beta=self.cfg.beta,
                                    gamma=self.cfg.gamma)
        return losses, reward_extras(rc, rr, chosen, rejected)
