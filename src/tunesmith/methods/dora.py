"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation", eq. 5):

    W' = m · (W0 + s·B A) / ||W0 + s·B A||_c

with a learned magnitude m (one entry per output feature, initialised to ||W0||_c) and the norm
taken per output row of the (d_out, d_in) weight, i.e. per column of the paper's (d_in, d_out) W.
As in §4.3 of the paper (and peft), the norm is treated as a constant in backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoraLinear, LowRankMethod
from ..kernels.dora import dora_linear, weight_sq_norm
from ..kernels.lora import frozen_weight
from .registry import register
from .configs.dora import DoraConfig


class DoraLinear(LoraLinear):
    """LoRA plus a magnitude vector ``lora_magnitude_vector`` (peft's key name), shape (d_out,)."""

    decodes_frozen = False

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, use_rslora: bool = False):
        super().__init__(base, r, alpha, dropout, use_rslora)
        a = self.lora_A.weight
        self.lora_magnitude_vector = nn.Parameter(torch.empty(base.out_features, device=a.device, dtype=a.dtype))
        self.register_buffer("_weight_sq", None, persistent=False)  # ||W0||² per row, for the fused path
        self.keep_output = False  # set by compile_decoder_layers on a checkpointed block's last projection

    def reset(self, init: str) -> None:
        super().reset(init)
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s·B A|| per output feature, detached (DoRA §4.3); shape (d_out,)."""
        with torch.no_grad():
            a = self.lora_A.weight
            w = self.base_layer.weight.to(a.dtype) + self.scaling * (self.lora_B.weight @ a)
            return torch.linalg.norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged or self.disabled:
            return base(x)
        weight = frozen_weight(base)  # None: a base layer without a fused path
        if weight is not None and type(self.lora_dropout) is nn.Identity:  # fused, see kernels/dora.py
            if self._weight_sq is None:
                self.before_compile()
            return dora_linear(x, weight, base.bias, self.lora_A.weight, self.lora_B.weight,
                               self.lora_magnitude_vector, self.scaling, self._weight_sq, self.keep_output)
        return self.forward_reference(x)

    def before_compile(self) -> None:
        """Fill the ||W0||² cache of the fused path (W0 is frozen) before a compiled graph reads it."""
        weight = frozen_weight(self.base_layer)
        if weight is not None and not self.merged:
            self._weight_sq = weight_sq_norm(weight)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """peft's formulation: base(x) + (m/n - 1)·W0 x' + (m/n)·s·B A x', x' = dropout(x)."""
        y = self.base_layer(x)
        a = self.lora_A.weight
        xa = x.to(a.dtype)
        xd = self.lora_dropout(xa)
        scale = self.lora_magnitude_vector / self.weight_norm()            # (d_out,)
        if xd is xa:  # no dropout active: reuse the base output without its bias
            bias = self.base_layer.bias
            base = (y if bias is None else y - bias).to(a.dtype)
        else:
            base = F.linear(xd, self.base_layer.weight.to(a.dtype))
        lora = self.lora_B(self.lora_A(xd)) * self.scaling
        return y + ((scale - 1) * base + scale * lora).to(y.dtype)

    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            norm = self.weight_norm()
            self.register_buffer("_merge_norm", norm, persistent=False)
            factor = (self.lora_magnitude_vector.detach() / norm).unsqueeze(1)   # (d_out, 1)
            w.data = (factor * (w.data.to(norm.dtype) + self.delta_weight().detach())).to(w.dtype)
            self.merged, self._weight_sq = True, None

    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            factor = (self.lora_magnitude_vector.detach() / self._merge_norm).unsqueeze(1)
            w.data = (w.data.to(factor.dtype) / factor - self.delta_weight().detach()).to(w.dtype)
            self.merged, self._weight_sq = False, None


@register
class Dora(LowRankMethod):
    auto_compile = True
    loads_peft = True
    Config = DoraConfig
    invariant_cases = [
        {},
        {"options": {"r": 4, "target_modules": ["q_proj", "v_proj"], "bias": "all", "use_rslora": True}},
        {"arch": "qwen2", "options": {"bias": "lora_only", "init": "gaussian", "lr_ratio_b": 4.0}},
        {"arch": "bert", "task": "classification", "options": {"r": 2}},
    ]

    @classmethod
    def accepts_peft(cls, peft_cfg: dict) -> bool:
        return cls.peft_type == peft_cfg.get("peft_type") and bool(peft_cfg.get("use_dora"))

    def make_layer(self, name: str, base: nn.Module) -> DoraLinear:
        layer = DoraLinear(base, self.cfg.r, self.cfg.alpha, self.cfg.dropout, self.cfg.use_rslora)
        layer.reset(self.cfg.init)
        return layer

    def rank_params(self, base: nn.Module) -> int:
        return self.cfg.r * (base.in_features + base.out_features) + base.out_features  # A, B and the magnitude

    def memory_extras(self, model: nn.Module, act) -> dict[str, float]:
        """The column norms of W + s·BA: one layer's dense fp32 update and its gradient at a time."""
        from .inject import as_linear, resolve_targets
        sizes = [as_linear(model.get_submodule(n)).weight.numel() for n in resolve_targets(model, self.cfg.target_modules)]
        return {"weight-norm temporaries": 2.0 * 4 * max(sizes, default=0)}

    def peft_config(self, model: nn.Module, base_name: str) -> dict:
        return {**super().peft_config(model, base_name), "use_dora": True}


def dora_trainable_count(model: nn.Module, r: int, targets: list[str]) -> int:
    """Closed form: sum over targets of r·(d_in + d_out) + d_out."""
    total = 0
    for n in targets:
        base = model.get_submodule(n).base_layer
        total += r * (base.in_features + base.out_features) + base.out_features
    return total
