"""The RL losses and advantages as pure functions of per-token log-probabilities, rewards and values.

Shapes: N completions (G per prompt, the G of a prompt adjacent), T completion positions; ``mask`` (N, T)
is 1 on the completion's real tokens. ``logp`` / ``old_logp`` / ``ref_logp`` (N, T) are log π(o_t | q, o_<t)
of the policy being updated, of the policy that sampled (detached) and of the reference.

Advantages
    * GRPO (Shao et al. 2024, eq. 3; Dr. GRPO: Liu et al. 2025): Â_i = (r_i − mean_g r) / (std_g r + ε)
      over the G completions of each prompt (``scale="group"``), the std of the whole batch (``"batch"``)
      or none (``"none"``: Â_i = r_i − mean_g r, Dr. GRPO). std is the unbiased one, ε = 1e-4 (as TRL).
    * RLOO (Ahmadian et al. 2024, eq. 6): Â_i = r_i − 1/(G−1) Σ_{j≠i} r_j.
    * PPO: GAE (Schulman et al. 2016, eq. 16): δ_t = r_t + γ V_{t+1} − V_t, Â_t = Σ_l (γλ)^l δ_{t+l},
      returns R_t = Â_t + V_t.

Policy losses, with ρ_t = exp(logp − old_logp) and the clipped ratio clip(ρ, 1 − ε_low, 1 + ε_high) (DAPO,
Yu et al. 2025: ε_high > ε_low lets unlikely tokens grow):
    ℓ_t = −min(ρ_t Â, clip(ρ_t) Â) + β · KL_t,   KL_t = exp(ref − logp) − (ref − logp) − 1  (k3, Schulman 2020)
aggregated (``loss_type``):
    * ``grpo``: (1/N) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}              (each sequence's mean, then the mean over sequences)
    * ``dapo``: Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|                  (token level: every token weighs the same)
    * ``dr_grpo``: Σ_{i,t} ℓ_{i,t} / (N · max_tokens)         (a constant normaliser: no length bias)
RLOO's loss is sequence level (as TRL): ρ_i = exp(Σ_t logp − Σ_t old_logp), L = (1/N) Σ_i −min(ρ_i Â_i, clip(ρ_i) Â_i).
PPO's value loss (Ziegler et al. 2019): ½ · mean_t max((V − R)², (clip(V, V_old ± ε_v) − R)²).

The losses come as *sums* with their normaliser (``policy_loss_sum`` / ``normaliser``), so one rollout batch
split into micro-batches weighs every item as the whole batch at once would.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-4   # added to the std of the rewards (as TRL)


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """GRPO advantages (N,) of rewards (N,) in groups of ``group`` adjacent completions."""
    r = rewards.float().view(-1, group)                                 # (P, G)
    centred = (r - r.mean(dim=1, keepdim=True)).view(-1)               # (N,)
    if scale == "none":
        return centred
    if scale == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros(())
        return centred / (std + EPS)
    std = r.std(dim=1, keepdim=True).expand_as(r).reshape(-1) if group > 1 else torch.zeros_like(centred)
    return centred / (std + EPS)


def rloo_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """Leave-one-out advantages (N,): each reward minus the mean of the other G − 1 of its group."""
    r = rewards.float().view(-1, group)                                 # (P, G)
    if group < 2:
        return torch.zeros_like(rewards, dtype=torch.float32)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group - 1)
    return (r - baseline).view(-1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / sqrt(var + 1e-8) over the masked entries (the mean added back with ``shift_mean=False``)."""
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * m


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate exp(ref − logp) − (ref − logp) − 1 (≥ 0, unbiased for samples of π)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """Per-token −min(ρ Â, clip(ρ, 1−ε_low, 1+ε_high) Â) (N, T) and the clipped-region mask (N, T)."""
    adv = advantages if advantages.dim() == logp.dim() else advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    region = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return loss, region


def token_losses(logp, old_logp, advantages, *, eps_low: float, eps_high: float, beta: float = 0.0,
                 ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ℓ_t (N, T) of the docstring above, the clipped-region mask and the per-token KL (None when β = 0)."""
    loss, region = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    kl = None
    if beta:
        kl = kl_k3(logp, ref_logp)
        loss = loss + beta * kl
    return loss, region, kl


def policy_loss_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The numerator of ``loss_type``'s aggregation over these rows (divide by :func:`normaliser` of the batch)."""
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()
    if loss_type in ("dapo", "dr_grpo"):
        return (per_token * m).sum()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def normaliser(loss_type: str, sequences: int, tokens: int, max_tokens: int) -> float:
    """What a whole batch's :func:`policy_loss_sum` is divided by: N (grpo), Σ|o_i| (dapo), N · max_tokens (dr_grpo)."""
    if loss_type == "grpo":
        return float(max(sequences, 1))
    if loss_type == "dapo":
        return float(max(tokens, 1))
    if loss_type == "dr_grpo":
        return float(max(sequences * max_tokens, 1))
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_loss(logp, old_logp, advantages, mask, *, loss_type: str = "grpo", eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, ref_logp=None, max_tokens: int | None = None) -> torch.Tensor:
    """The GRPO / DAPO / Dr. GRPO loss of one whole batch (the mean form of the module docstring)."""
    per_token, _, _ = token_losses(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high, beta=beta,
                                   ref_logp=ref_logp)
    total = policy_loss_sum(per_token, mask, loss_type)
    return total / normaliser(loss_type, mask.shape[0], int(mask.sum()), max_tokens or mask.shape[1])


def rloo_loss_sum(seq_logp, old_seq_logp, advantages, *, eps_low: float = 0.2, eps_high: float = 0.2):
    """Σ_i −min(ρ_i Â_i, clip(ρ_i) Â_i) with sequence-level ρ_i (divide by N), and the clipped-region mask (N,)."""
    loss, region = clipped_surrogate(seq_logp, old_seq_logp, advantages, eps_low, eps_high)
    return loss.sum(), region


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (N, T) by GAE over each row's masked (left-aligned) positions; V = 0 past the end."""
    m = mask.to(values.dtype)
    values = values * m
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        nxt = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, adv + values


def ppo_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (N, T): −kl_coef · (logp − ref_logp) at every token, the score added at each row's
    last real token (Ziegler et al. 2019); and the per-token KL estimate logp − ref_logp."""
    m = mask.to(logp.dtype)
    kl = (logp - ref_logp) * m
    rewards = -kl_coef * kl
    last = (m.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += score.to(rewards.dtype)
    return rewards * m, kl


def ppo_value_loss_sum(values, old_values, returns, mask, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t ½ max((V − R)², (clip(V, V_old ± clip) − R)²) over the mask (divide by the token count), and the
    fraction of tokens where the clipped term was the larger."""
    m = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * (torch.max(a, b) * m).sum(), ((b > a).to(m.dtype) * m).sum() / m.sum().clamp(min=1)


class KLController:
    """The KL coefficient of PPO: fixed, or adaptive (Ziegler et al. 2019, §2.2):
    e = clip(KL / target − 1, −0.2, 0.2), β ← β · (1 + e · n / horizon) after n samples."""

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(value), target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state.get("value", self.value))
