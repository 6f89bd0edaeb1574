"""P-tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks").

Deep prompt tuning (§3.2, Fig. 2b): trained prompts at every layer, not only at the input; each
layer l attends over [P_k^l; K^l] and [P_v^l; V^l], with the prompts trained directly, without the
reparameterisation encoder of prefix tuning (§3.3, "Reparameterization": dropped by default).
The table starts (``init: tokens``) from the keys and values the frozen model computes for sampled
vocabulary tokens, as prefix tuning's real-word initialisation (Li & Liang 2021, §7.2), so the
model's outputs start near the base model's; ``init: random`` is N(0, 1), as peft's PrefixEncoder.
The official implementation stores one (n, layers·2·d_kv) table, as here; the keys/values enter
through transformers' DynamicCache, so generation with the KV cache works.
"""
from __future__ import annotations

from torch import nn

from ._prompting import KVPrefixMethod
from ._virtual import PrefixTable, kv_shape, token_kv
from .registry import register
from .configs.ptuning_v2 import PtuningV2Config


@register
class PtuningV2(KVPrefixMethod):
    Config = PtuningV2Config
    peft_type = "PREFIX_TUNING"
    loads_peft = False  # a plain peft prefix adapter loads as `prefix`; the folded forms are identical

    def make(self, model: nn.Module) -> PrefixTable:
        n = self.cfg.num_virtual_tokens
        return PrefixTable(n, kv_shape(model), init=token_kv(model, n) if self.cfg.init == "tokens" else None)

    def encoder_params(self, model: nn.Module) -> int:
        return ptuning_v2_trainable_count(model, self.cfg.num_virtual_tokens)

    def peft_fields(self, model: nn.Module) -> dict:
        return {"prefix_projection": False}


def ptuning_v2_trainable_count(model: nn.Module, n: int) -> int:
    """Closed form: n · layers · 2 · kv_heads · head_dim."""
    d = kv_shape(model)
    return n * d["layers"] * 2 * d["kv_heads"] * d["head_dim"]
