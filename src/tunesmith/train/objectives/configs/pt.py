"""Config of the ``pt`` objective (continued pre-training)."""
from __future__ import annotations

from typing import ClassVar, Literal

from .. import ObjectiveConfig, register_config


@register_config
class PretrainConfig(ObjectiveConfig):
    summary: ClassVar[str] = "Continued pre-training: loss on every token of raw text (packed)."
    formats: ClassVar[tuple[str, ...]] = ("text", "alpaca", "messages", "sharegpt")
    default_for: ClassVar[tuple[str, ...]] = ("text",)
    tokenized: ClassVar[str] = "pt"
    packing: ClassVar[bool] = True
    chunked_ce: ClassVar[bool] = True
    loss_chunks: ClassVar[bool] = True
    name: Literal["pt"] = "pt"
