"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

The reward of a completion (the weighted reward functions, typically a reward model trained with
``objective: rm`` through the ``reward_model`` reward) is given at its last token; every token also gets
−β (log π_old − log π_ref), with β fixed or adapted towards ``kl_target``. A value head (a linear layer on
the policy's last hidden state, zero at the start) gives V_t; GAE(γ, λ) turns rewards and values into
advantages (whitened over the batch) and returns. Each of μ epochs minimises, over the completion tokens,

    −min(ρ_t Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_t) + vf_coef · ½ max((V_t − R_t)², (clip(V_t, V_old ± ε_v) − R_t)²)

averaged over the batch's tokens. The formulas are in ``train/rl/losses.py``. The value head trains in
the run's optimizer on its schedule; it is kept in the checkpoints and is not part of the saved adapter
or model.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .configs.ppo import PPOConfig
from ..rl import losses
from ..rl.logps import token_logps
from ..rl.online import OnlineObjective, stat_sums


@register
class PPO(OnlineObjective):
    Config = PPOConfig
    needs_reference = True
    needs_old = True

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.kl = losses.KLController(self.cfg.kl_coef, self.cfg.kl_target, self.cfg.kl_horizon)
        self.v_head: nn.Linear | None = None

    def train_step(self, *, batches, tokenizer, run):
        step = super().train_step(batches=batches, tokenizer=tokenizer, run=run)
        step.on_optimizer = self._add_value_head
        return step

    def _add_value_head(self, model, optimizer, scheduler) -> None:
        if self.v_head is not None:
            return
        p = next(q for q in model.parameters())
        width = model.get_output_embeddings().weight.shape[1]
        self.v_head = nn.Linear(width, 1).to(device=p.device, dtype=torch.float32)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        lr = scheduler.base_lrs[0]
        optimizer.add_param_group({"params": list(self.v_head.parameters()), "lr": optimizer.param_groups[0]["lr"],
                                   "initial_lr": lr, "weight_decay": 0.0})
        scheduler.base_lrs.append(lr)                      # the value head follows the schedule too
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        scheduler._last_lr.append(optimizer.param_groups[0]["lr"])

    def value_head(self, model):
        return self.v_head

    def step_state(self) -> dict:
        head = {k: v.detach().cpu().reshape(-1).tolist() for k, v in self.v_head.state_dict().items()}
        return {"kl_coef": self.kl.value, "value_head": head}

    def load_step_state(self, state: dict) -> None:
        self.kl.load_state_dict({"value": state.get("kl_coef", self.kl.value)})
        if "value_head" in state:
            with torch.no_grad():
                for k, v in self.v_head.state_dict().items():
                    v.copy_(torch.tensor(state["value_head"][k], dtype=v.dtype).reshape(v.shape))

    def advantages(self, roll, chunks):
        parts = []
        for c in chunks:
            score = roll.total[c["index"]].to(c["completion_mask"].device)
            rewards, kl = losses.ppo_rewards(score, c["old_logp"].float(), c["ref_logp"].float(),
                                             c["completion_mask"], self.kl.value)
            c["seq_kl"] = kl.sum(-1)
            parts.append(rewards)
        if self.cfg.whiten_rewards:
            flat = torch.cat([p[c["completion_mask"].bool()] for p, c in zip(parts, chunks)])
            mean, std = flat.mean(), flat.std() if flat.numel() > 1 else flat.new_ones(())
            parts = [((p - mean) / (std + 1e-8)) * c["completion_mask"] for p, c in zip(parts, chunks)]
        advs = []
        for p, c in zip(parts, chunks):
            adv, ret = losses.gae(p, c["old_values"], c["completion_mask"], self.cfg.gamma, self.cfg.lam)
            c["returns"] = ret
            advs.append(adv)
        flat = torch.cat([a[c["completion_mask"].bool()] for a, c in zip(advs, chunks)])
        mean, var = flat.mean(), flat.var(unbiased=False)
        for a, c in zip(advs, chunks):
            c["advantages"] = (a - mean) * torch.rsqrt(var + 1e-8) * c["completion_mask"]

    def after_rollout(self, chunks):
        seq_kl = torch.cat([c["seq_kl"] for c in chunks]).float()
        coef = self.kl.value
        self.kl.update(float(seq_kl.mean()), int(seq_kl.numel()))
        return {"kl_coef": coef, "sequence_kl": float(seq_kl.mean())}

    def normaliser(self, chunks):
        return max(1.0, float(sum(float(c["completion_mask"].sum()) for c in chunks)))

    def micro_loss(self, model, c):
        cfg, mask = self.cfg, c["completion_mask"]
        logp, entropy, values = token_logps(model, c, cfg.temperature, self.v_head)
        pg, region = losses.clipped_surrogate(logp, c["old_logp"], c["advantages"], cfg.eps_low, cfg.eps_high)
        vf, vf_clipped = losses.ppo_value_loss_sum(values, c["old_values"], c["returns"], mask, cfg.cliprange_value)
        loss = (pg * mask).sum() + cfg.vf_coef * vf
        stats = stat_sums(mask, entropy, region, losses.kl_k3(logp.detach(), c["ref_logp"]))
        stats.update(value_loss=vf.detach(), value_clipped=vf_clipped * mask.sum())
        return loss, stats
