"""Config of the ``kto`` objective (Kahneman–Tversky optimisation on unpaired data)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ....errors import ConfigError

from .. import register_config
from ._preference import ReferenceConfig


@register_config
class KTOConfig(ReferenceConfig):
    summary: ClassVar[str] = ("KTO on unpaired (prompt, completion, label) rows: desirable and undesirable "
                              "completions against a reference policy (Ethayarajh et al. 2024).")
    formats: ClassVar[tuple[str, ...]] = ("kto",)
    default_for: ClassVar[tuple[str, ...]] = ("kto",)
    tokenized: ClassVar[str] = "unpaired"
    packing: ClassVar[bool] = False
    name: Literal["kto"] = "kto"
    desirable_weight: float = Field(1.0, gt=0, description="λ_D: weight of the desirable completions' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="λ_U: weight of the undesirable completions' losses.")

    def check(self, train_cfg, method_cls, model_kind: str) -> None:
        super().check(train_cfg, method_cls, model_kind)
        if self.precompute_reference:
            raise ConfigError("objective.precompute_reference: not available for kto yet (its reference pass "
                              "also scores the mismatched KL completions); set it to false")
