"""Config of the ``orpo`` objective (odds-ratio preference optimisation)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .. import register_config
from ._preference import PairConfig


@register_config
class ORPOConfig(PairConfig):
    summary: ClassVar[str] = ("ORPO: SFT on chosen plus an odds-ratio penalty on rejected, no reference policy "
                              "(Hong et al. 2024).")
    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, description="λ: weight of the odds-ratio term beside the chosen responses' NLL.")
