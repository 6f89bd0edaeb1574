"""Config of method dora: the YAML `method:` section (implementation: tunesmith/methods/dora.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import field_validator

from ..registry import register_config
from .lora import LoraConfig


@register_config
class DoraConfig(LoraConfig):
    family: ClassVar[str] = "low-rank"
    summary: ClassVar[str] = "Weight-decomposed LoRA: learned magnitude × direction of W + B·A (Liu et al. 2024)."
    name: Literal["dora"] = "dora"

    @field_validator("target_parameters")
    @classmethod
    def _no_parameters(cls, v):
        if v:
            raise ValueError("dora adapts linear layers only (its magnitude is per output row of one layer); use method lora for expert and router weights")
        return v

    @field_validator("init")
    @classmethod
    def _no_pissa(cls, v):
        if v == "pissa":
            raise ValueError("init 'pissa' is not supported with dora; valid: kaiming, gaussian, zero_b")
        return v
