"""Config of method dylora: the YAML `method:` section (implementation: tunesmith/methods/dylora.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..registry import register_config
from .lora import TargetedConfig


@register_config
class DyLoraConfig(TargetedConfig):
    family: ClassVar[str] = "low-rank"
    default_lr: ClassVar[float] = 1e-3
    summary: ClassVar[str] = ("LoRA trained over all ranks r_min..r_max at once; pick the rank after training "
                              "(Valipour et al. 2023).")
    name: Literal["dylora"] = "dylora"
    r_min: int = Field(1, ge=1, description="Smallest rank drawn during training.")
    r_max: int = Field(8, ge=1, description="Largest rank (the size of A and B).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: at rank b the update is multiplied by alpha/b.")

    @model_validator(mode="after")
    def _ranks(self):
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) must be <= r_max ({self.r_max})")
        return self
