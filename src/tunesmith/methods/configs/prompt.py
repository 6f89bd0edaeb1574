"""Config of method prompt: the YAML `method:` section (implementation: tunesmith/methods/prompt.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ..registry import MethodConfig, register_config


@register_config
class PromptConfig(MethodConfig):
    family: ClassVar[str] = "additive"
    default_lr: ClassVar[float] = 3e-2
    summary: ClassVar[str] = "Prompt tuning: n trained embeddings prepended to the input (Lester et al. 2021)."
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Number of trained prompt tokens prepended "
                                                                   "to every input.")
    init_text: str | None = Field(
        None, description="Initialise the prompts from the embeddings of this text (repeated or cut to "
                          "num_virtual_tokens tokens); null samples vocabulary embeddings.")

    @field_validator("init_text")
    @classmethod
    def _nonempty(cls, v):
        if v is not None and not v.strip():
            raise ValueError("empty text; give some words (e.g. 'Classify the sentiment of this review') or null")
        return v
