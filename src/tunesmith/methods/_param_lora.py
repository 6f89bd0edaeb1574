"""LoRA on weights that no linear layer holds: the fused expert weights and the router of
mixture-of-experts blocks (Hu et al. 2021, eq. 3, applied per expert).

transformers stores all experts of a block as one 3-D parameter per projection (see
:func:`tunesmith.models.compat.experts_transposed`). Each expert e gets its own rank-r update,

    W'_e = W_e + s · B_e A_e,     A_e: (r, d_in), B_e: (d_out, r),  s = alpha / r (rsLoRA: alpha / √r),

held as HF peft's ``ParamWrapper`` holds it, so that adapters load both ways: ``lora_A`` is one
(r·E, d_in) matrix whose rows are grouped by expert (row e·r + k is A_e's row k), ``lora_B`` one
(d_out, r·E) matrix whose columns are grouped by rank (column k·E + e is B_e's column k). A 2-D weight
(a router, (E, d_in)) is E = 1: plain LoRA. The owner module computes with W' in place of W
(:class:`~tunesmith.methods.inject.ParamTarget`), so every experts implementation transformers
dispatches to (a loop over experts, batched or grouped matmuls) sees the adapted weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..models.compat import experts_transposed
from .inject import ParamTarget
from .lora import init_lora_


class ParamLora(ParamTarget):
    """A rank-r update of every expert's slice of one 2-D or 3-D parameter; names match peft's."""

    def __init__(self, base: nn.Module, param_name: str, r: int, alpha: float, use_rslora: bool = False):
        super().__init__(base, param_name)
        w = self.param()
        self.transposed = w.ndim == 3 and experts_transposed(self._owner)
        if w.ndim == 3:
            experts, d1, d2 = w.shape
            d_in, d_out = (d1, d2) if self.transposed else (d2, d1)
        else:
            experts, (d_out, d_in) = 1, w.shape
        self.num_experts, self.r, self.stacked = experts, r, w.ndim == 3
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        kw = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.Linear(d_in, r * experts, bias=False, **kw)
        self.lora_B = nn.Linear(r * experts, d_out, bias=False, **kw)

    def reset(self, init: str) -> None:
        init_lora_(self.lora_A.weight, self.lora_B.weight, init, self.r)

    def delta_weight(self) -> torch.Tensor:
        """s · B_e A_e for every expert, in the parameter's own shape."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if not self.stacked:
            return (b @ a) * self.scaling                                  # (d_out, d_in)
        a = a.view(self.num_experts, self.r, a.shape[1])                  # (E, r, d_in)
        b = b.view(b.shape[0], self.r, self.num_experts)                  # (d_out, r, E)
        layout = "ore,eri->eio" if self.transposed else "ore,eri->eoi"   # (E, d_in, d_out) | (E, d_out, d_in)
        return torch.einsum(layout, b, a) * self.scaling

    def effective(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta_weight().to(w.dtype)

    def merge(self) -> None:
        if not self.merged:
            w = self.param()
            w.data += self.delta_weight().detach().to(w.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            w = self.param()
            w.data -= self.delta_weight().detach().to(w.dtype)
            self.merged = False


def param_lora_count(model: nn.Module, r: int, names: list[str]) -> int:
    """Closed form: r·E·(d_in + d_out) for each targeted (E, ·, ·) parameter (E = 1 for 2-D)."""
    total = 0
    for n in names:
        shape = dict(model.named_parameters())[n].shape
        experts = shape[0] if len(shape) == 3 else 1
        total += r * experts * (shape[-1] + shape[-2])
    return total


def parameter_fields(config_cls, peft_cfg: dict) -> dict:
    """The LoRA config fields of a peft adapter's target_parameters (a parameter-only adapter has no modules)."""
    params = peft_cfg.get("target_parameters")
    if not params:
        return {}
    if "target_parameters" not in config_cls.model_fields:
        raise ConfigError("adapter_config.json: target_parameters (adapted expert/router weights) load as "
                          "method lora only")
    out = {"target_parameters": list(params)}
    if not peft_cfg.get("target_modules"):
        out["target_modules"] = []
    return out
