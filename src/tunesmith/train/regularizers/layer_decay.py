"""Layer-wise learning-rate decay (Clark et al. 2020, ELECTRA, §A; Howard & Ruder 2018's discriminative rates).

With ``L`` transformer blocks, a parameter at depth ``k`` gets ``lr · decay^k``: the head and everything
above the blocks (final norm, pooler, classifier) ``k = 0``, block ``i`` (0-based from the input)
``k = L - i``, the embeddings ``k = L + 1``. Blocks are found by name (``layers.N``, ``layer.N``, ``h.N``,
``blocks.N``); embeddings by ``embed``/``wte``/``wpe`` in the name. Each of the method's groups is split by
depth, keeping its other keys; the schedule then scales every group alike.
"""
from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field

from ...errors import ConfigError
from . import Regularizer, register

BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
EMBED = re.compile(r"(embed|(?:^|\.)wte(?:\.|$)|(?:^|\.)wpe(?:\.|$))")


def depths(model) -> dict[str, int]:
    """Parameter name -> depth k (0 at the head, L + 1 at the embeddings)."""
    names = [n for n, _ in model.named_parameters()]
    blocks = [int(m.group(1)) for n in names if (m := BLOCK.search(n))]
    if not blocks:
        raise ConfigError("train.regularize.layer_decay: found no numbered blocks (layers.N, layer.N, h.N, "
                          "blocks.N) among the model's parameters")
    n_layers = max(blocks) + 1
    out = {}
    for n in names:
        m = BLOCK.search(n)
        out[n] = n_layers - int(m.group(1)) if m else (n_layers + 1 if EMBED.search(n) else 0)
    return out


@register
class LayerDecay(Regularizer):
    summary: ClassVar[str] = "Layer-wise learning-rate decay: lr·decay^depth, the head at depth 0 (ELECTRA)."
    name: Literal["layer_decay"] = "layer_decay"
    decay: float = Field(0.8, gt=0, le=1, description="Factor per block going down from the head to the embeddings.")

    def param_groups(self, model, groups: list[dict]) -> list[dict]:
        depth = depths(model)
        name_of = {id(p): n for n, p in model.named_parameters()}
        out = []
        for g in groups:
            by_depth: dict[int, list] = {}
            for p in g["params"]:
                by_depth.setdefault(depth.get(name_of.get(id(p)), 0), []).append(p)
            out += [{**g, "params": ps, "lr": g["lr"] * self.decay ** k, "depth": k}
                    for k, ps in sorted(by_depth.items())]
        return out
