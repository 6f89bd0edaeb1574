"""Config of method fishmask: the YAML `method:` section (implementation: tunesmith/methods/fishmask.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..registry import MethodConfig, register_config


DEFAULT_FRACTION = 0.005


@register_config
class FishMaskConfig(MethodConfig):
    family: ClassVar[str] = "selective"
    default_lr: ClassVar[float] = 2e-3
    summary: ClassVar[str] = ("Train the top-k Fisher-information entries, a fixed sparse mask (Sung et al. "
                              "2021); sparse delta.")
    name: Literal["fishmask"] = "fishmask"
    fraction: float | None = Field(
        None, gt=0, le=1, description=f"Fraction of the base model's entries to train (default "
                                      f"{DEFAULT_FRACTION} = 0.5% when count is unset).")
    count: int | None = Field(None, ge=1, description="Number of entries to train (instead of fraction).")
    fisher_samples: int = Field(1024, ge=1, description="Training examples over which the Fisher is estimated "
                                                        "(one backward pass each).")
    selection: Literal["fisher", "random"] = Field(
        "fisher", description="How the mask is chosen: fisher (FishMask) or random (the paper's baseline).")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.fraction is not None and self.count is not None:
            raise ValueError(f"set either method.fraction ({self.fraction}) or method.count ({self.count}), not both")
        return self
