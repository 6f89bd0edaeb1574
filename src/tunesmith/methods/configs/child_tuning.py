"""Config of method child_tuning: the YAML `method:` section (implementation: tunesmith/methods/child_tuning.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..registry import MethodConfig, register_config


@register_config
class ChildTuningConfig(MethodConfig):
    family: ClassVar[str] = "selective"
    default_lr: ClassVar[float] = 1e-4   # mode D; mode F: 3e-4 (learning_rate)
    summary: ClassVar[str] = ("Update a child network: Bernoulli gradient masks (F) or a top-Fisher subset (D) "
                              "(Xu et al. 2021).")
    name: Literal["child_tuning"] = "child_tuning"
    mode: Literal["F", "D"] = Field(
        "D", description="F: a fresh Bernoulli(p) gradient mask every step; D: a fixed child network of the "
                         "top-p Fisher entries.")
    p: float = Field(0.3, gt=0, le=1, description="F: probability p_F that a gradient entry is kept (kept entries "
                                                  "are scaled by 1/p_F); D: fraction p_D of entries in the child "
                                                  "network.")
    fisher_samples: int | None = Field(
        None, ge=1, description="D: training examples over which the Fisher is estimated (null: the whole "
                                "training set, as in the paper).")

    def learning_rate(self) -> float:
        """D trains a fixed subset at the fine-tuning rate; F's random masks and 1/p_F scaling want 3x more."""
        return 3e-4 if self.mode == "F" else self.default_lr
