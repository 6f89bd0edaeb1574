"""GRPO (Shao et al. 2024), with DAPO's token-level loss and split clipping (Yu et al. 2025) and Dr. GRPO's
unnormalised advantages and constant normaliser (Liu et al. 2025). The formulas: ``train/rl/losses.py``;
the rollout and the step: ``train/rl/online.py``."""
from __future__ import annotations

from . import register
from .configs.grpo import GRPOConfig
from ..rl import losses
from ..rl.logps import token_logps
from ..rl.online import OnlineObjective, stat_sums


@register
class GRPO(OnlineObjective):
    Config = GRPOConfig

    def advantages(self, roll, chunks):
        adv = losses.group_advantages(roll.total, self.cfg.num_generations, self.cfg.scale_rewards)
        for c in chunks:
            c["advantages"] = adv[c["index"]].to(c["completion_mask"].device)

    def normaliser(self, chunks):
        n = sum(c["completion_mask"].shape[0] for c in chunks)
        tokens = int(sum(float(c["completion_mask"].sum()) for c in chunks))
        return losses.normaliser(self.cfg.loss_type, n, tokens, self.cfg.max_tokens)

    def micro_loss(self, model, c):
        cfg, mask = self.cfg, c["completion_mask"]
        logp, entropy, _ = token_logps(model, c, cfg.temperature)
        old = c["old_logp"] if c.get("old_logp") is not None else logp.detach()
        per_token, region, kl = losses.token_losses(logp, old, c["advantages"], eps_low=cfg.eps_low,
                                                    eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=c.get("ref_logp"))
        if kl is None and "ref_logp" in c:
            kl = losses.kl_k3(logp.detach(), c["ref_logp"])
        return losses.policy_loss_sum(per_token, mask, cfg.loss_type), stat_sums(mask, entropy, region, kl)
