"""Config of method ptuning: the YAML `method:` section (implementation: tunesmith/methods/ptuning.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..registry import MethodConfig, register_config


@register_config
class PtuningConfig(MethodConfig):
    family: ClassVar[str] = "additive"
    default_lr: ClassVar[float] = 3e-2
    summary: ClassVar[str] = ("P-tuning v1: input virtual tokens from an LSTM/MLP prompt encoder, folded (Liu et "
                              "al. 2021).")
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Number of virtual tokens prepended to every "
                                                                   "input.")
    encoder: Literal["lstm", "mlp"] = Field(
        "lstm", description="Prompt encoder: lstm (the paper's bidirectional LSTM + 2-layer MLP) or mlp "
                            "(3-layer ReLU MLP).")
    encoder_hidden: int | None = Field(None, ge=1, description="Hidden size of the prompt encoder (null: the "
                                                               "model's hidden size).")
