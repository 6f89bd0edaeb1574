"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer l attends over [P_k^l; K^l] and [P_v^l; V^l]: n trained key/value vectors
before the real ones (§4.1, h_i = P_θ[i,:] for i in the prefix). Training optimises the
reparameterisation P_θ = MLP_θ(P'_θ) (§4.3, eq. 5): a small table P' ∈ R^{n×d_kv} through
Linear(d_kv → reparam_hidden) · tanh · Linear(→ layers·2·d_kv), as HF peft's PrefixEncoder with
prefix_projection. After training only P_θ is kept (the MLP is folded away) and inference reads
it from the table. The prefix enters through transformers' DynamicCache, so ``model.generate``
and the KV cache work as for any prompt.

Initialisation (``init``): ``tokens`` (the default) starts the prefix at the keys and values the frozen
model computes for sampled vocabulary tokens, Li & Liang's initialisation with real words' activations
(§7.2), with the MLP learning the change from them (P_θ = P_0 + MLP_θ(P'_θ), the MLP's last layer zero at
the start, so the model's outputs start as the base model's after those tokens); ``random`` is peft's
PrefixEncoder exactly (P_θ = MLP_θ(P'_θ), PyTorch's default initialisation).
"""
from __future__ import annotations

import torch
from torch import nn

from ._prompting import KVPrefixMethod
from ._virtual import KVPrefix, kv_shape, token_kv
from .registry import register
from .configs.prefix import PrefixConfig


class PrefixMlp(KVPrefix):
    """P = P_0 + Linear2(tanh(Linear1(P'))), P' ∈ R^{n×d_kv}; names match peft (embedding, transform).
    ``start`` P_0 (n, layers·2·d_kv), a fixed buffer, zeroes Linear2 so that P starts at P_0; without
    it P_0 = 0 and the layers keep PyTorch's initialisation (peft's PrefixEncoder)."""

    def __init__(self, n: int, shape: dict[str, int], hidden: int, start: torch.Tensor | None = None):
        super().__init__(n, shape)
        d_kv = shape["kv_heads"] * shape["head_dim"]
        self.embedding = nn.Embedding(n, d_kv)
        self.transform = nn.Sequential(nn.Linear(d_kv, hidden), nn.Tanh(), nn.Linear(hidden, self.width()))
        self.register_buffer("start", start, persistent=False)   # rebuilt from the base model on load
        if start is not None:
            nn.init.zeros_(self.transform[2].weight)
            nn.init.zeros_(self.transform[2].bias)

    def table(self) -> torch.Tensor:
        out = self.transform(self.embedding.weight)        # (n, layers·2·d_kv)
        return out if self.start is None else out + self.start.to(out.dtype)


@register
class Prefix(KVPrefixMethod):
    Config = PrefixConfig
    peft_type = "PREFIX_TUNING"
    invariant_cases = [
        {},
        {"arch": "qwen2", "options": {"num_virtual_tokens": 3, "reparam_hidden": 8}},
        {"arch": "bert", "task": "classification", "options": {"num_virtual_tokens": 4}},
    ]

    def make(self, model: nn.Module) -> PrefixMlp:
        n = self.cfg.num_virtual_tokens
        start = token_kv(model, n) if self.cfg.init == "tokens" else None
        return PrefixMlp(n, kv_shape(model), self.cfg.reparam_hidden, start)

    def encoder_params(self, model: nn.Module) -> int:
        return prefix_trainable_count(model, self.cfg.num_virtual_tokens, self.cfg.reparam_hidden)

    def peft_fields(self, model: nn.Module) -> dict:
        return {"prefix_projection": True, "encoder_hidden_size": self.cfg.reparam_hidden}

    @classmethod
    def config_from_peft(cls, peft_cfg: dict):
        return cls.Config(name=cls.name, num_virtual_tokens=peft_cfg["num_virtual_tokens"],
                          reparam_hidden=peft_cfg.get("encoder_hidden_size") or 512, init="random")


def prefix_trainable_count(model: nn.Module, n: int, hidden: int) -> int:
    """Closed form: n·d_kv + (d_kv·h + h) + (h·L·2·d_kv + L·2·d_kv)."""
    d = kv_shape(model)
    d_kv = d["kv_heads"] * d["head_dim"]
    out = d["layers"] * 2 * d_kv
    return n * d_kv + d_kv * hidden + hidden + hidden * out + out
