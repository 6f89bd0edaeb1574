"""Config of method prefix: the YAML `method:` section (implementation: tunesmith/methods/prefix.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..registry import MethodConfig, register_config


@register_config
class PrefixConfig(MethodConfig):
    family: ClassVar[str] = "additive"
    default_lr: ClassVar[float] = 3e-4
    summary: ClassVar[str] = ("Prefix tuning: trained key/value prefixes in every layer via a folded MLP (Li & "
                              "Liang 2021).")
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Prefix length: trained key/value vectors per "
                                                                   "layer.")
    reparam_hidden: int = Field(512, ge=1, description="Hidden size of the training-time MLP that produces the "
                                                       "prefix (folded away after training).")
    init: Literal["tokens", "random"] = Field(
        "tokens", description="Start of the prefix: 'tokens' = the keys/values the frozen model computes for "
                              "sampled vocabulary tokens, the MLP learning the change (outputs start near the base "
                              "model's); 'random' = peft's PrefixEncoder with PyTorch's initialisation.")
