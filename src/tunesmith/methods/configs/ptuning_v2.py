"""Config of method ptuning_v2: the YAML `method:` section (implementation: tunesmith/methods/ptuning_v2.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..registry import MethodConfig, register_config


@register_config
class PtuningV2Config(MethodConfig):
    family: ClassVar[str] = "additive"
    default_lr: ClassVar[float] = 3e-2
    summary: ClassVar[str] = ("P-tuning v2: deep prompts (keys/values) at every layer, no reparameterisation (Liu "
                              "et al. 2022).")
    name: Literal["ptuning_v2"] = "ptuning_v2"
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Prompt length: trained key/value vectors per "
                                                                   "layer.")
    init: Literal["tokens", "random"] = Field(
        "tokens", description="Start of the prompts: 'tokens' = the keys/values the frozen model computes for "
                              "sampled vocabulary tokens (outputs start near the base model's); 'random' = "
                              "N(0, 1) entries, as HF peft.")
