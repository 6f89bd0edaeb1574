"""KTO, Kahneman–Tversky optimisation (Ethayarajh et al. 2024, eq. 7), on unpaired completions.

With the log-ratio r = log π(y|x) − log π_ref(y|x) of each completion and the batch's KL estimate
z = max(0, mean over the batch of the mismatched pairs' log-ratios log π(y'|x) − log π_ref(y'|x)),
taken without gradient:

    L(x, y) = λ_D (1 − σ(β (r − z)))   for a desirable y,      λ_U (1 − σ(β (z − r)))   for an undesirable y

The mismatched pairs are each prompt with the previous row's completion (``data.tokenize.tokenize_unpaired``).
"""
from __future__ import annotations

import torch

from ...data.collate import HOST
from . import register
from ._logps import row_sequence, with_host
from ._preference import PairObjective, Reference
from .configs.kto import KTOConfig


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
             desirable: torch.Tensor, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses (B,), rewards β r (B,) and the KL estimate z, from summed log-probs (B,) of the
    completions and of the mismatched KL completions, and ``desirable`` (B,) booleans."""
    z = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    r = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    return losses, beta * r.detach(), z


def _rows(batch: dict, prefix: str) -> tuple[dict, int]:
    rows = {k: batch[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "labels")}
    rows["sequence"] = row_sequence(rows["labels"])
    labels = (batch.get(HOST) or {}).get(f"{prefix}labels")
    return with_host(rows, labels, None if labels is None else row_sequence(labels)), rows["labels"].shape[0]


@register
class KTO(PairObjective):
    Config = KTOConfig

    def count(self, batch):
        return int(batch["label"].shape[0])

    def prepare(self, model, method, datasets, *, run) -> None:
        self.reference = Reference(model, self.logps_fn)

    def loss(self, model, batch):
        rows, b = _rows(batch, "")
        kl_rows, _ = _rows(batch, "kl_")
        if self.reference is None:
            self.reference = Reference(model, self.logps_fn)
        logps = self.logps_fn(model, rows, b)[0]
        with torch.no_grad():
            kl = self.logps_fn(model, kl_rows, b)[0]
        c = self.cfg
        desirable = batch["label"].bool()
        losses, rewards, z = kto_loss(logps, self.reference(model, rows, b), kl, self.reference(model, kl_rows, b),
                                      desirable, beta=c.beta, desirable_weight=c.desirable_weight,
                                      undesirable_weight=c.undesirable_weight)
        d = desirable.float()
        extra = {"rewards/chosen": (rewards * d).sum(), "rewards/rejected": (rewards * (1 - d)).sum(),
                 "kl": z * b, "logps/chosen": (logps.detach() * d).sum(),
                 "logps/rejected": (logps.detach() * (1 - d)).sum()}
        return losses.sum(), b, extra
