"""Config of the ``rloo`` objective (REINFORCE leave-one-out)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .. import register_config
from ._rl import OnlineConfig


@register_config
class RLOOConfig(OnlineConfig):
    summary: ClassVar[str] = ("Online RL with the leave-one-out baseline (RLOO, Ahmadian et al. 2024): "
                              "sequence-level ratio, KL as a reward penalty.")
    name: Literal["rloo"] = "rloo"
    normalize_advantages: bool = Field(False, description="Whiten the advantages over the batch.")

    @model_validator(mode="after")
    def _group(self):
        if self.num_generations < 2:
            raise ValueError("rloo needs num_generations >= 2 (the baseline is the other completions' mean)")
        return self
