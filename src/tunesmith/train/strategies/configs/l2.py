from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .. import StrategyConfig, register_config


@register_config
class L2Config(StrategyConfig):
    summary: ClassVar[str] = "L2 towards the weights the run started from (init_from): λ/2 Σ (θ - θ*)²."
    name: Literal["l2"] = "l2"
    lam: float = Field(0.01, ge=0.0, alias="lambda", description="λ of the penalty λ/2 Σ (θ - θ*)² over the "
                                                                 "trainable parameters.")
    model_config = {**StrategyConfig.model_config, "populate_by_name": True, "serialize_by_alias": True}
