from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .. import StrategyConfig, register_config


@register_config
class DannConfig(StrategyConfig):
    summary: ClassVar[str] = ("Domain-adversarial training (Ganin et al. 2016): a gradient-reversal layer and a domain "
                              "discriminator on the pooled representation, with unlabelled target text.")
    name: Literal["dann"] = "dann"
    target: str = Field(description="Unlabelled target-domain rows (.jsonl, .csv, ...): the text of each is its "
                                    "'text' (or 'sentence') field after field_map; labels, if any, are not read.")
    field_map: dict[str, str] = Field(default_factory=dict, description="Renames keys of the target rows.")
    max_rows: int | None = Field(None, ge=1, description="First N target rows.")
    weight: float = Field(1.0, ge=0.0, description="Weight of the domain loss in the total loss.")
    lam: float = Field(1.0, ge=0.0, alias="lambda", description="Largest gradient-reversal coefficient λ.")
    schedule: Literal["ganin", "constant"] = Field(
        "ganin", description="ganin: λ_p = λ (2 / (1 + exp(-γ p)) - 1), p the fraction of training done (0 → λ); "
                             "constant: λ throughout.")
    gamma: float = Field(10.0, gt=0.0, description="γ of the ganin schedule.")
    hidden: int = Field(256, ge=1, description="Hidden width of the discriminator (Linear → ReLU → Linear → 2).")
    lr: float | None = Field(None, gt=0.0, description="Learning rate of the discriminator (null: 10 × train.lr, "
                                                       "as Ganin et al. train it faster than the encoder).")
    model_config = {**StrategyConfig.model_config, "populate_by_name": True, "serialize_by_alias": True}
