"""Config of the ``dpo`` objective (DPO, IPO, SLiC hinge, robust/conservative DPO, RPO)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .. import register_config
from ._preference import ReferenceConfig


@register_config
class DPOConfig(ReferenceConfig):
    summary: ClassVar[str] = ("Direct preference optimisation against a reference policy: sigmoid (DPO), ipo, "
                              "hinge (SLiC), robust; label smoothing (cDPO), RPO's SFT term.")
    default_for: ClassVar[tuple[str, ...]] = ("preference",)
    name: Literal["dpo"] = "dpo"
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid: −log σ(β h) (Rafailov et al. 2023); ipo: (h/|y| − 1/(2β))², the log-ratios "
                               "averaged over each response's tokens (Azar et al. 2023, as TRL); hinge: "
                               "max(0, 1 − β h) (SLiC, Zhao et al. 2023); robust: the unbiased noisy-label loss of "
                               "Chowdhury et al. 2024 with label_smoothing ε. h = log-ratio of chosen − of rejected.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="ε, the assumed rate of flipped labels: with sigmoid, conservative DPO "
                                         "(−(1−ε) log σ(βh) − ε log σ(−βh)); with robust, its debiased form.")
    rpo_alpha: float | None = Field(
        None, ge=0.0, description="Weight of an SFT term on the chosen responses (RPO, Pang et al. 2024: the mean "
                                  "token NLL of the chosen responses of the batch); null: none.")

    @model_validator(mode="after")
    def _smoothing(self):
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            raise ValueError(f"label_smoothing applies to loss_type sigmoid or robust, not {self.loss_type!r}")
        return self
