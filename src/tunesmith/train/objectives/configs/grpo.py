"""Config of the ``grpo`` objective (GRPO, DAPO's and Dr. GRPO's aggregations)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .. import register_config
from ._rl import OnlineConfig


@register_config
class GRPOConfig(OnlineConfig):
    summary: ClassVar[str] = ("Online RL with group-relative advantages (GRPO): loss grpo, dapo (token level) or "
                              "dr_grpo; DAPO's ε_low/ε_high clipping; KL β.")
    default_for: ClassVar[tuple[str, ...]] = ("prompt",)
    name: Literal["grpo"] = "grpo"
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "grpo", description="How per-token losses are averaged: grpo, each sequence's mean then the mean over "
                            "sequences (Shao et al. 2024); dapo, over all tokens of the batch (Yu et al. 2025); "
                            "dr_grpo, their sum / (sequences × max_tokens) (Liu et al. 2025).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantage = (r − group mean) / std of the group (group), of the batch (batch), or "
                             "not divided (none, as Dr. GRPO).")

    @model_validator(mode="after")
    def _group(self):
        if self.num_generations < 2:
            raise ValueError("grpo needs num_generations >= 2 (the advantages are relative to the group)")
        return self
