"""Config of the ``simpo`` objective (simple preference optimisation)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .. import register_config
from ._preference import PairConfig


@register_config
class SimPOConfig(PairConfig):
    summary: ClassVar[str] = ("SimPO: length-normalised log-probs as the reward with a target margin γ, no "
                              "reference policy (Meng et al. 2024).")
    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0, description="β: scale of the length-normalised reward β/|y| log π(y|x).")
    gamma: float = Field(1.0, ge=0, description="γ: the target reward margin between chosen and rejected.")
