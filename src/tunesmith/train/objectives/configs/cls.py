"""Config of the ``cls`` objective (sequence classification)."""
from __future__ import annotations

from typing import ClassVar, Literal

from .. import ObjectiveConfig, register_config


@register_config
class ClassificationConfig(ObjectiveConfig):
    summary: ClassVar[str] = "Sequence classification with a task head (encoders and decoders)."
    task: ClassVar[str] = "classification"
    formats: ClassVar[tuple[str, ...]] = ("classification",)
    default_for: ClassVar[tuple[str, ...]] = ("classification",)
    tokenized: ClassVar[str] = "cls"
    eval_tasks: ClassVar[tuple[str, ...]] = ("classification",)
    name: Literal["cls"] = "cls"
