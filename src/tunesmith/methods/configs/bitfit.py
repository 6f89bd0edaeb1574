"""Config of method bitfit: the YAML `method:` section (implementation: tunesmith/methods/bitfit.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ..registry import MethodConfig, register_config


@register_config
class BitFitConfig(MethodConfig):
    family: ClassVar[str] = "selective"
    default_lr: ClassVar[float] = 3e-3
    summary: ClassVar[str] = ("Train only the biases (plus the task head) (Ben Zaken et al. 2022); adds zero "
                              "biases to bias-free models.")
    name: Literal["bitfit"] = "bitfit"
    add_missing_biases: Literal["auto"] | bool | list[str] = Field(
        "auto", description="Zero-initialised biases for linear layers without one: auto (attention and MLP "
                            "projections, only if the model has no biases), true (every such projection "
                            "lacking one), false (never), or a list of module names.")

    @field_validator("add_missing_biases")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("empty list; give module names, auto, true or false")
        return v
