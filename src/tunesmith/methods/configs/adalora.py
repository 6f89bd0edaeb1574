"""Config of method adalora: the YAML `method:` section (implementation: tunesmith/methods/adalora.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..registry import register_config
from .lora import TargetedConfig


@register_config
class AdaLoraConfig(TargetedConfig):
    family: ClassVar[str] = "low-rank"
    default_lr: ClassVar[float] = 1e-3
    summary: ClassVar[str] = ("SVD-form LoRA whose per-layer ranks are pruned to a budget by importance (Zhang et "
                              "al. 2023).")
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, description="Initial rank of every adapted layer (the starting budget).")
    target_r: int = Field(8, ge=0, description="Average final rank: the final budget is target_r × layers.")
    tinit: int = Field(0, ge=0, description="Warm-up steps before any rank is pruned.")
    tfinal: int = Field(0, ge=0, description="Final steps trained with the rank pattern fixed.")
    deltaT: int = Field(1, ge=1, description="Steps between two budget allocations.")
    total_steps: int | None = Field(None, ge=1, description="Length of the budget schedule in optimizer steps "
                                                            "(null: the run's total steps).")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA coefficient of the sensitivity (eq. 8).")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA coefficient of the uncertainty (eq. 9).")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser of P and Q.")
    alpha: float = Field(8.0, gt=0, description="Scale numerator: the update is multiplied by alpha/init_r.")

    @model_validator(mode="after")
    def _schedule(self):
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        if self.total_steps is not None and self.tinit >= self.total_steps - self.tfinal:
            raise ValueError(f"tinit ({self.tinit}) must be < total_steps - tfinal "
                             f"({self.total_steps} - {self.tfinal}); lower tinit or tfinal")
        return self
