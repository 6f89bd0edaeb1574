"""Dropout overrides: the model's dropout rates set for this run, whatever its config says.

``p`` sets every ``nn.Dropout`` module (hidden states, attention probabilities, classifier heads);
``attention``, when given, sets the rate on the attention probabilities instead: an ``nn.Dropout`` whose own
name holds ``attn``/``attention`` (GPT-2's ``attn_dropout``) or that sits in a ``*SelfAttention`` module
(BERT), and the float ``attention_dropout`` that decoder attention passes to its kernel. The model config's ``*dropout*`` fields follow, so a saved model keeps the rates.
"""
from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field

from . import Regularizer, register

ATTENTION = re.compile(r"(attention|attn)", re.IGNORECASE)


def _on_attention_probs(name: str, parents: dict) -> bool:
    parent, _, own = name.rpartition(".")
    return bool(ATTENTION.search(own)) or type(parents.get(parent)).__name__.endswith("SelfAttention")


def set_dropout(model, p: float | None, attention: float | None) -> int:
    """Set the rates in place; returns how many modules changed."""
    from torch import nn
    changed = 0
    parents = dict(model.named_modules())
    for name, module in parents.items():
        in_attention = attention is not None and _on_attention_probs(name, parents)
        rate = attention if in_attention else p
        if isinstance(module, nn.Dropout) and rate is not None:
            module.p = rate
            changed += 1
        elif isinstance(getattr(module, "attention_dropout", None), float) and attention is not None:
            module.attention_dropout = attention
            changed += 1
    cfg = getattr(model, "config", None)
    for key in list(vars(cfg)) if cfg is not None else []:
        if "dropout" in key and isinstance(getattr(cfg, key), float):
            rate = attention if (attention is not None and "attention" in key) else p
            if rate is not None:
                setattr(cfg, key, rate)
    return changed


@register
class Dropout(Regularizer):
    summary: ClassVar[str] = "Override the model's dropout rates (all, or the attention ones apart)."
    name: Literal["dropout"] = "dropout"
    p: float | None = Field(0.1, ge=0, lt=1, description="Rate of every dropout module (null: leave them).")
    attention: float | None = Field(None, ge=0, lt=1, description="Rate of the attention dropout (modules inside "
                                                                   "attention, attention_dropout); null: p.")

    def apply(self, model) -> None:
        set_dropout(model, self.p, self.attention)
