"""FishMask: train a fixed sparse mask of the parameters with the largest Fisher information
(Sung, Nair & Raffel 2021, "Training Neural Networks with Fixed Sparse Masks", NeurIPS).

The mask keeps the k entries with the largest diagonal empirical Fisher (their eq. 2, with the
observed label), estimated once before training over ``fisher_samples`` training examples:

    F̂(θ_j) = 1/N · Σ_{i=1..N} (∂ log p_θ(y_i | x_i) / ∂θ_j)²,      mask = top-k_j F̂(θ_j)

k is one global budget over all base tensors (``fraction`` of them, or ``count``); only those
entries train. The optimizer holds k values and 2·k Adam moments (not dense state); the task head
of a classifier trains in full. The checkpoint is a sparse delta (indices + values).
``selection: random`` gives the paper's random-mask baseline.
"""
from __future__ import annotations

from torch import nn

from ._fisher import budget, empirical_fisher, random_scores
from ._sparse import SparseMaskMethod, fisher_bytes
from .registry import register
from .configs.fishmask import FishMaskConfig, DEFAULT_FRACTION


@register
class FishMask(SparseMaskMethod):
    Config = FishMaskConfig
    invariant_cases = [
        {},
        {"options": {"count": 5000}},
        {"arch": "qwen2", "options": {"fraction": 0.05, "selection": "random"}},
        {"arch": "bert", "task": "classification", "options": {"fraction": 0.01}},
    ]

    def budget_of(self, total: int) -> int:
        return budget(total, self.cfg.fraction or DEFAULT_FRACTION, self.cfg.count)

    def prepare_bytes(self, model: nn.Module, act) -> float:
        """The Fisher: an fp32 accumulator and a dense gradient of every candidate, one example's activations."""
        return 0.0 if self.cfg.selection == "random" else fisher_bytes(model, act, self.device)

    def scores(self, model: nn.Module, batches, objective, tensors):
        if self.cfg.selection == "random":
            return random_scores(tensors)
        fisher, self.fisher_examples = empirical_fisher(model, batches, objective, tensors, self.cfg.fisher_samples)
        return fisher
