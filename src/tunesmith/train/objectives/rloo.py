"""RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline, as TRL's RLOOTrainer: the KL to the
reference (first order, Σ_t log π_old − log π_ref) subtracted from each completion's reward with weight β,
a sequence-level clipped ratio. The formulas: ``train/rl/losses.py``."""
from __future__ import annotations

import torch

from . import register
from .configs.rloo import RLOOConfig
from ..rl import losses
from ..rl.logps import token_logps
from ..rl.online import OnlineObjective, stat_sums


@register
class RLOO(OnlineObjective):
    Config = RLOOConfig

    @property
    def needs_old(self):
        return bool(self.cfg.beta)

    def advantages(self, roll, chunks):
        rewards = roll.total.clone()
        if self.cfg.beta:
            kl = torch.cat([((c["old_logp"] - c["ref_logp"]) * c["completion_mask"]).sum(-1).float().cpu()
                            for c in chunks])
            rewards = rewards - self.cfg.beta * kl
        adv = losses.rloo_advantages(rewards, self.cfg.num_generations)
        if self.cfg.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + losses.EPS)
        for c in chunks:
            c["advantages"] = adv[c["index"]].to(c["completion_mask"].device)

    def normaliser(self, chunks):
        return float(sum(c["completion_mask"].shape[0] for c in chunks))

    def micro_loss(self, model, c):
        cfg, mask = self.cfg, c["completion_mask"]
        logp, entropy, _ = token_logps(model, c, cfg.temperature)
        seq = (logp * mask).sum(-1)
        old = (c["old_logp"] * mask).sum(-1) if c.get("old_logp") is not None else seq.detach()
        loss, region = losses.rloo_loss_sum(seq, old, c["advantages"], eps_low=cfg.eps_low, eps_high=cfg.eps_high)
        kl = losses.kl_k3(logp.detach(), c["ref_logp"]) if "ref_logp" in c else None
        return loss, stat_sums(mask, entropy, region[:, None].expand_as(mask), kl)
