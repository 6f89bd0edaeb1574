"""Config of the ``ppo`` objective (PPO with a value head, GAE and a fixed or adaptive KL penalty)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .. import register_config
from ._rl import OnlineConfig


@register_config
class PPOConfig(OnlineConfig):
    summary: ClassVar[str] = ("Online RL with PPO: a value head, GAE, clipped policy and value losses, a fixed or "
                              "adaptive KL penalty; the reward (e.g. an rm run's score) at the last token.")
    name: Literal["ppo"] = "ppo"
    num_generations: int = Field(1, ge=1, description="Completions sampled per prompt.")
    updates: int = Field(2, ge=1, description="μ: PPO epochs over each rollout batch.")
    gamma: float = Field(1.0, ge=0, le=1, description="γ: discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="λ: GAE's bias/variance trade-off.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    cliprange_value: float = Field(0.2, gt=0, description="The value is clipped to V_old ± this.")
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token penalty −β (log π − log π_ref) in the "
                                                   "reward; the start value when kl_target is set.")
    kl_target: float | None = Field(None, gt=0, description="Adapt β towards this KL per sequence (Ziegler et "
                                                            "al. 2019); null: β stays fixed.")
    kl_horizon: int = Field(10000, ge=1, description="Horizon of the adaptive KL controller (in samples).")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards over the batch before GAE.")
    beta: float = Field(0.0, ge=0, le=0, description="Unused by ppo (its KL penalty is kl_coef, in the reward).")
