from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from .. import StrategyConfig, register_config


@register_config
class EwcConfig(StrategyConfig):
    summary: ClassVar[str] = ("Elastic weight consolidation (Kirkpatrick et al. 2017): λ/2 Σ F (θ - θ*)² with F the "
                              "diagonal Fisher of the previous task.")
    name: Literal["ewc"] = "ewc"
    lam: float = Field(100.0, ge=0.0, alias="lambda", description="λ of the penalty λ/2 Σ_i F_i (θ_i - θ*_i)².")
    data: dict[str, Any] | None = Field(
        None, description="The previous task's data section (train, format, field_map, ...), read as data: is; "
                          "the Fisher is estimated on its training examples. Filled in by `stages:` from the stage "
                          "before.")
    fisher_examples: int = Field(256, ge=1, description="Examples of that data the Fisher is averaged over "
                                                        "(the first ones), one gradient each.")
    model_config = {**StrategyConfig.model_config, "populate_by_name": True, "serialize_by_alias": True}
