"""Config of method lora: the YAML `method:` section (implementation: tunesmith/methods/lora.py)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..registry import MethodConfig, register_config


class TargetedConfig(MethodConfig):
    """Fields shared by the methods that wrap target modules with an adapter."""

    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] | None = Field(
        None, description="Module names (suffix match), a full-match regex, 'all-linear', or null for "
                          "the architecture's attention and MLP projections.")
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (task heads are added "
                          "automatically for classification).")

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("empty list; give module names, a regex, 'all-linear' or null")
        return v


@register_config
class LoraConfig(TargetedConfig):
    family: ClassVar[str] = "low-rank"
    default_lr: ClassVar[float] = 1e-3
    summary: ClassVar[str] = ("Low-rank update B·A beside frozen linear layers (Hu et al. 2021); rsLoRA, PiSSA "
                              "init, LoRA+.")
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is multiplied by alpha/r.")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases train: none, all biases, or those of adapted layers.")
    init: Literal["kaiming", "gaussian", "zero_b", "pissa"] = Field(
        "kaiming", description="Adapter init. B = 0 and A is: kaiming = peft's default kaiming-uniform; "
                               "gaussian = N(0, 1/r²) as peft's 'gaussian'; zero_b = the paper's N(0, 1/d_in). "
                               "pissa = A, B from the top-r singular vectors of W and the base weight replaced "
                               "by the residual (peft's init_lora_weights='pissa'); saved as a rank-2r LoRA "
                               "for the original base, as peft's path_initial_model_for_weight_conversion.")
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r.")
    lr_ratio_b: float = Field(1.0, gt=0, description="LoRA+: B's learning rate is lr_ratio_b × train.lr "
                                                     "(the paper suggests 16; 1 = plain LoRA).")
    target_parameters: list[str] | None = Field(
        None, description="Weights no linear layer holds, adapted directly (peft's target_parameters): the fused "
                          "3-D expert weights and the router of mixture-of-experts blocks. Parameter names (suffix "
                          "match, e.g. experts.down_proj, mlp.gate.weight), or the words experts and router for the "
                          "architecture's own; null: none (experts and router stay frozen). With it, target_modules "
                          "may be [] to adapt only these.")

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v):
        return v  # an empty list is checked with target_parameters below

    @model_validator(mode="after")
    def _parameter_targets(self):
        if self.target_modules == [] and not self.target_parameters:
            raise ValueError("target_modules: empty list; give module names, a regex, 'all-linear' or null "
                             "(or target_parameters to adapt only those)")
        if self.target_parameters is not None:
            if not self.target_parameters:
                raise ValueError("target_parameters: empty list; give parameter names, experts, router, or null")
            if self.dropout > 0:
                raise ValueError("dropout acts on a layer's input, which target_parameters have none of "
                                 f"(got dropout={self.dropout}); set dropout 0 or drop target_parameters")
            if self.init == "pissa":
                raise ValueError("init 'pissa' is not supported with target_parameters; valid: kaiming, gaussian, zero_b")
        return self
