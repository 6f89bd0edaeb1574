"""Elastic weight consolidation (Kirkpatrick et al. 2017, eq. 3): L(θ) = L_B(θ) + Σ_i λ/2 F_i (θ_i - θ*_A,i)².

θ*_A: the trainable weights when training begins (those of the previous task, loaded by ``init_from``);
F: the diagonal of the empirical Fisher of task A at θ*_A, F_i = 1/N Σ_n (∂ log p(y_n | x_n) / ∂θ_i)², one
gradient per example of the previous task's training data (the objective's summed loss of that example is
-log p(y | x): the label for classification, the response tokens for sft). Dropout is off while it is
estimated.
"""
from __future__ import annotations

import sys

import torch

from ...data import collate
from ...data.build import build_datasets
from ...data.collate import to_device
from ...data.config import DataConfig
from ...errors import ConfigError
from ..loop import autocast
from . import Strategy, register, trainable
from .configs.ewc import EwcConfig
from .l2 import anchored_penalty


def diagonal_fisher(model, objective, examples, pad_id: int, device, precision: str = "fp32") -> list[torch.Tensor]:
    """F_i = mean over ``examples`` of (∂ objective-loss-sum / ∂θ_i)² for the trainable θ, in their order."""
    params = [p for _, p in trainable(model)]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was = model.training
    model.eval()
    n = 0
    for ex in examples:
        batch = to_device(collate([ex], pad_id), device)
        with autocast(device, precision):
            loss_sum, _, _ = objective.loss(model, batch)
        grads = torch.autograd.grad(loss_sum, params, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f += g.detach().float().pow(2)
        n += 1
    model.train(was)
    return [f / max(n, 1) for f in fisher]


@register
class Ewc(Strategy):
    Config = EwcConfig

    def prepare(self, model, ctx) -> None:
        if self.cfg.data is None:
            raise ConfigError("strategies: ewc needs data (the previous task's data section, e.g. {train: FILE}); "
                              "in a stages: config it is the stage before")
        try:
            dcfg = DataConfig.model_validate({**self.cfg.data, "val_split": 0.0, "validation": None})
        except ValueError as e:
            raise ConfigError(f"strategies: ewc.data: {e}") from None
        ds, _, _ = build_datasets(dcfg, ctx.tokenizer, max_seq_len=ctx.max_seq_len, objective=ctx.objective.cfg,
                                  seed=ctx.seed)
        examples = [ds[i] for i in range(min(len(ds), self.cfg.fisher_examples))]
        self.params = [p for _, p in trainable(model)]
        self.anchor = [p.detach().clone() for p in self.params]
        self.fisher = diagonal_fisher(model, ctx.objective, examples, ctx.pad_id, ctx.device, ctx.precision)
        print(f"ewc: diagonal Fisher from {len(examples)} examples of {dcfg.train or 'the mixture'} "
              f"(mean {sum(float(f.sum()) for f in self.fisher) / max(sum(f.numel() for f in self.fisher), 1):.3g})",
              file=sys.stderr, flush=True)
        self.last = 0.0

    def loss(self, model):
        pen = anchored_penalty(self.params, self.anchor, self.fisher)
        self.last = float(pen.detach())
        return 0.5 * self.cfg.lam * pen

    def metrics(self) -> dict:
        return {"ewc/weighted_sq_distance": self.last}
