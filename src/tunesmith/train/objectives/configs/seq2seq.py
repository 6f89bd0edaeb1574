"""Config of the ``seq2seq`` objective (encoder-decoders)."""
from __future__ import annotations

from typing import ClassVar, Literal

from .. import ObjectiveConfig, register_config

FORMATS = ("alpaca", "messages", "sharegpt")


@register_config
class Seq2SeqConfig(ObjectiveConfig):
    summary: ClassVar[str] = ("Sequence to sequence (encoder-decoders): the loss on the target tokens the "
                              "decoder writes.")
    task: ClassVar[str] = "seq2seq"
    formats: ClassVar[tuple[str, ...]] = FORMATS
    default_for: ClassVar[tuple[str, ...]] = FORMATS
    encoder_decoder: ClassVar[bool] = True
    tokenized: ClassVar[str] = "seq2seq"
    name: Literal["seq2seq"] = "seq2seq"
