"""Config of method ia3: the YAML `method:` section (implementation: tunesmith/methods/ia3.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ..registry import MethodConfig, register_config


Targets = str | list[str] | None


@register_config
class Ia3Config(MethodConfig):
    family: ClassVar[str] = "additive"
    default_lr: ClassVar[float] = 3e-2
    summary: ClassVar[str] = ("(IA)³: learned rescaling of keys, values and feed-forward activations; merges (Liu "
                              "et al. 2022).")
    name: Literal["ia3"] = "ia3"
    target_modules: Targets = Field(
        None, description="Linear layers to rescale (suffix match or full-match regex); null: the "
                          "architecture's key, value and feed-forward output projections.")
    feedforward_modules: Targets = Field(
        None, description="Which of target_modules are feed-forward output layers whose input is rescaled "
                          "(the others rescale their output); null: the feed-forward output projections.")

    @field_validator("target_modules", "feedforward_modules")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("empty list; give module names, a regex or null")
        return v
