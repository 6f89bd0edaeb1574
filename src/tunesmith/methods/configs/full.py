"""Config of method full: the YAML `method:` section (implementation: tunesmith/methods/full.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from ..registry import MethodConfig, register_config


@register_config
class FullConfig(MethodConfig):
    family: ClassVar[str] = "full"
    default_lr: ClassVar[float] = 1e-4
    summary: ClassVar[str] = "Full fine-tuning: every weight trains; saves a transformers model directory."
    name: Literal["full"] = "full"
