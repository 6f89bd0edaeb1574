"""Config of method qlora: the YAML `method:` section (implementation: tunesmith/methods/qlora.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ..registry import register_config
from .lora import LoraConfig


@register_config
class QloraConfig(LoraConfig):
    family: ClassVar[str] = "low-rank"
    default_lr: ClassVar[float] = 1e-3
    summary: ClassVar[str] = ("LoRA on a frozen 4-bit NF4 base with double quantization (Dettmers et al. 2023); "
                              "needs bitsandbytes (CUDA, or its CPU backend).")
    name: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type of the frozen base: nf4 (NormalFloat, the paper's) or fp4.")
    double_quant: bool = Field(True, description="Quantize the per-block scales too (double quantization, "
                                                 "~0.37 bits/parameter saved).")

    @field_validator("target_parameters")
    @classmethod
    def _no_parameters(cls, v):
        if v:
            raise ValueError("qlora adapts linear layers only (the 4-bit base is its linear layers); use method lora for expert and router weights")
        return v

    @field_validator("init")
    @classmethod
    def _no_pissa(cls, v):
        if v == "pissa":
            raise ValueError("init 'pissa' is not supported with qlora (it rewrites the base weight, which is "
                             "quantized here); valid: kaiming, gaussian, zero_b")
        return v
