"""Config of method freeze: the YAML `method:` section (implementation: tunesmith/methods/freeze.py)."""
from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ..registry import MethodConfig, register_config

LayerSpec = int | str
ParamType = Literal["norms", "biases", "attention", "mlp"]


@register_config
class FreezeConfig(MethodConfig):
    family: ClassVar[str] = "selective"
    default_lr: ClassVar[float] = 1e-4
    summary: ClassVar[str] = ("Train chosen layers (index, range, first/last k), parameter types (norms, biases, "
                              "attention, mlp), embeddings or regexes; freeze the rest; saves a delta.")
    name: Literal["freeze"] = "freeze"
    layers: LayerSpec | list[LayerSpec] = Field(
        "last 2", description="Blocks to train: indices (negative counts from the end), 'a-b' ranges, "
                              "'first k', 'last k', 'all' or 'none'.")
    include: list[str] = Field(default_factory=list, description="Regexes (searched in parameter names) of "
                                                                 "further parameters to train.")
    exclude: list[str] = Field(default_factory=list, description="Regexes of parameters kept frozen even if "
                                                                 "selected above.")
    types: list[ParamType] = Field(
        default_factory=list, description="Parameter types trained in every layer besides the selection above: "
                                          "norms, biases, attention (projections), mlp (projections).")
    layer_types: list[ParamType] | None = Field(
        None, description="Within the chosen layers train only these parameter types (null: all of them).")
    embeddings: bool = Field(False, description="Also train the input embeddings.")
    head: bool | None = Field(None, description="Train the task head (null: yes for classification heads).")

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v):
        for r in v:
            try:
                re.compile(r)
            except re.error as e:
                raise ValueError(f"invalid regex {r!r}: {e}") from None
        return v
