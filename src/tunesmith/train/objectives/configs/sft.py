"""Config of the ``sft`` objective (supervised fine-tuning)."""
from __future__ import annotations

from typing import ClassVar, Literal

from .. import ObjectiveConfig, register_config


@register_config
class SFTConfig(ObjectiveConfig):
    summary: ClassVar[str] = "Supervised fine-tuning: loss on response tokens only (prompts masked)."
    formats: ClassVar[tuple[str, ...]] = ("alpaca", "messages", "sharegpt")
    default_for: ClassVar[tuple[str, ...]] = ("alpaca", "messages", "sharegpt")
    tokenized: ClassVar[str] = "sft"
    packing: ClassVar[bool] = True
    chunked_ce: ClassVar[bool] = True
    loss_chunks: ClassVar[bool] = True
    eval_tasks: ClassVar[tuple[str, ...]] = ("lm", "generation")
    name: Literal["sft"] = "sft"
