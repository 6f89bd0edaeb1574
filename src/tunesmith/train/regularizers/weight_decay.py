"""Weight-decay groups: no decay on normalisation weights and biases, by name and module type.

The parameters that decay are transformers' ``Trainer.get_decay_parameter_names``: every parameter except
those of ``nn.LayerNorm`` modules and those whose name matches ``bias``, ``layernorm``, ``rmsnorm``,
``norm`` or ``_norm`` (so RMSNorm weights of any model class are caught by name). ``embeddings: false`` also
spares the input embeddings. Each of the method's groups is split in two, keeping its other keys (its lr).
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from . import Regularizer, register

NO_DECAY_NAMES = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_names(model, embeddings: bool = True) -> set[str]:
    """Names of the parameters that weight decay applies to."""
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names
    names = set(get_parameter_names(model, [nn.LayerNorm], NO_DECAY_NAMES))
    if not embeddings:
        embed = model.get_input_embeddings()
        names -= {n for n, p in model.named_parameters() if any(p is q for q in embed.parameters())}
    return names


@register
class WeightDecayGroups(Regularizer):
    summary: ClassVar[str] = "Weight decay on everything but norms and biases (transformers' Trainer groups)."
    name: Literal["weight_decay"] = "weight_decay"
    value: float | None = Field(None, ge=0, description="Decay of the decaying group (null: train.weight_decay).")
    embeddings: bool = Field(True, description="Decay the input embeddings too.")

    def param_groups(self, model, groups: list[dict]) -> list[dict]:
        decay = decay_names(model, self.embeddings)
        name_of = {id(p): n for n, p in model.named_parameters()}
        out = []
        for g in groups:
            wd = self.value if self.value is not None else _decay_of(groups)
            yes = [p for p in g["params"] if name_of.get(id(p)) in decay]
            no = [p for p in g["params"] if name_of.get(id(p)) not in decay]
            out += [{**g, "params": yes, "weight_decay": wd}, {**g, "params": no, "weight_decay": 0.0}]
        return out


def _decay_of(groups: list[dict]) -> float:
    """train.weight_decay as the method's groups carry it (the largest of theirs)."""
    return max((float(g.get("weight_decay", 0.0)) for g in groups), default=0.0)
