"""Child-tuning: update only a child network of the pretrained model (Xu et al. 2021, "Raise a Child in
Large Language Model: Towards Effective and Generalizable Fine-tuning", EMNLP).

The update of step t is masked (their eq. 2):  w_{t+1} = w_t − η · (∂L/∂w_t ⊙ M_t)

* mode ``F`` (task-free, eq. 3): each step M_t ~ Bernoulli(p_F) entrywise, and the kept gradient
  is scaled by 1/p_F so that its expectation is the full gradient. Applied in
  ``before_optimizer_step`` (after clipping, as in the paper's optimizer). So that AdamW's
  momentum and weight decay do not move the entries dropped at step t either, their values are
  restored after the step (the paper's optimizer lets momentum move them).
* mode ``D`` (task-driven, eq. 4–5): the diagonal Fisher F(w) = 1/|D| Σ_j (∂L(x_j, y_j)/∂w)² over
  the training data (``fisher_samples`` examples, one backward each) picks the top p_D fraction
  of entries once; gradients outside this child network are zero for the whole run. Implemented
  as a fixed sparse mask (see ``_sparse``): only the child network's entries are trainable values,
  so AdamW keeps k-sized moments and weight decay never touches the rest. Sparse delta checkpoint.

Both modes mask every base tensor; a classifier's new task head trains in full. (The reference
implementation restricts D's mask to the encoder layers and trains embeddings in full.)
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import delta
from ._fisher import budget, empirical_fisher
from ._sparse import SparseMaskMethod, fisher_bytes, head_prefixes, load_delta_method
from .registry import Method, register
from .configs.child_tuning import ChildTuningConfig


@register
class ChildTuning(Method):
    """Dispatches on ``mode`` to :class:`ChildTuningF` or :class:`ChildTuningD` at construction."""

    Config = ChildTuningConfig
    artifact = "delta"
    identity_at_init = True
    mergeable = True
    invariant_cases = [
        {},
        {"options": {"mode": "F", "p": 0.5}},
        {"arch": "qwen2", "options": {"mode": "D", "p": 0.1}},
        {"arch": "bert", "task": "classification", "options": {"mode": "F"}},
        {"arch": "bert", "task": "classification", "options": {"mode": "D", "p": 0.05}},
    ]

    def __new__(cls, cfg: ChildTuningConfig | None = None):
        target = _VARIANTS[cfg.mode] if cls is ChildTuning and cfg is not None else cls
        return super().__new__(target)

    @classmethod
    def load_artifact(cls, model: nn.Module, path: Path) -> nn.Module:
        return load_delta_method(ChildTuning, model, path)


class ChildTuningD(ChildTuning, SparseMaskMethod):
    """Task-driven: a fixed top-p_D Fisher mask, trained as sparse values."""

    def budget_of(self, total: int) -> int:
        return budget(total, self.cfg.p, None)

    def prepare_bytes(self, model: nn.Module, act) -> float:
        return fisher_bytes(model, act, self.device)

    def scores(self, model: nn.Module, batches, objective, tensors):
        fisher, self.fisher_examples = empirical_fisher(model, batches, objective, tensors, self.cfg.fisher_samples)
        return fisher


class ChildTuningF(ChildTuning):
    """Task-free: a Bernoulli(p_F) gradient mask drawn every step, kept entries scaled by 1/p_F."""

    def apply(self, model: nn.Module) -> nn.Module:
        heads = head_prefixes(model)
        self.masked = {}
        for n, p in model.named_parameters():
            p.requires_grad_(True)
            if not n.startswith(heads):
                self.masked[n] = p
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        return model

    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """grad ← grad ⊙ M / p_F with M ~ Bernoulli(p_F); remembers M and the current values."""
        p_keep = self.cfg.p
        self._pending = []
        for p in self.masked.values():
            if p.grad is None:
                continue
            keep = torch.rand(p.shape, device=p.device) < p_keep
            p.grad.mul_(keep).div_(p_keep)
            self._pending.append((p, keep, p.detach().clone()))

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Entries dropped this step get their pre-step values back (no momentum or decay drift)."""
        for p, keep, old in self._pending:
            p.copy_(torch.where(keep, p, old))
        self._pending = []

    def save(self, model: nn.Module, out_dir: Path, base_name: str) -> Path:
        # every entry may have changed over the run: the delta is dense
        return delta.write_delta(out_dir / "delta", self.trainable_state(model), base=base_name,
                                 method=self.cfg.model_dump(mode="json"))


_VARIANTS: dict[str, type[ChildTuning]] = {"F": ChildTuningF, "D": ChildTuningD}
