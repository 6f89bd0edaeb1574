"""Config of method adapter: the YAML `method:` section (implementation: tunesmith/methods/adapter.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..registry import MethodConfig, register_config


@register_config
class AdapterConfig(MethodConfig):
    family: ClassVar[str] = "additive"
    default_lr: ClassVar[float] = 1e-3
    summary: ClassVar[str] = ("Bottleneck adapters after attention/FFN (Houlsby 2019), FFN only (Pfeiffer) or "
                              "parallel (He 2022).")
    name: Literal["adapter"] = "adapter"
    reduction_factor: float = Field(16.0, gt=0, description="Bottleneck size m = hidden_size / reduction_factor "
                                                            "(at least 1).")
    placement: Literal["houlsby", "pfeiffer", "parallel"] = Field(
        "houlsby", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only; "
                               "parallel: beside the feed-forward sublayer (He et al. 2022).")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Bottleneck nonlinearity f.")
    scaling: float | None = Field(None, gt=0, description="Scale s of the adapter's output (null: 1 for houlsby/"
                                                          "pfeiffer, 4 for parallel).")
