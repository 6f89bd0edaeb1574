"""Reward modelling: a Bradley–Terry model of the preferences on a scalar head (Ouyang et al. 2022, eq. 1).

The model is the sequence-classification form of the base with one output: a causal LM scores the last
token before the padding (transformers' rule), an encoder its pooled first token. For a pair with rewards
r_w = r(x, y_w) and r_l = r(x, y_l), and an optional margin m (Llama 2, Touvron et al. 2023, eq. 2):

    L = −log σ(r_w − r_l − m)  [+ c · (r_w + r_l)²  with center_rewards c (Eisenstein et al. 2023)]

Pair accuracy is the share of pairs with r_w > r_l (a tie counts half), the margin the mean r_w − r_l.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._preference import pair_count
from . import Objective
from ...errors import ConfigError
from .configs.rm import RewardConfig


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center: float | None = None) -> torch.Tensor:
    """Per-pair Bradley–Terry losses (B,) from the rewards (B,) of the chosen and rejected responses."""
    diff = chosen - rejected if margin is None else chosen - rejected - margin
    losses = -F.logsigmoid(diff)
    if center:
        losses = losses + center * (chosen + rejected) ** 2
    return losses


def rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head's reward of each row (R,)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


@register
class RewardModel(Objective):
    Config = RewardConfig

    def count(self, batch):
        return pair_count(batch)

    def prepare(self, model, method, datasets, *, run) -> None:
        if self.cfg.margin and any(ds is not None and "margin" not in ds[0] for ds in datasets):
            raise ConfigError("objective.margin: true needs a numeric `margin` field on every preference row; "
                              "add it to the data or set objective.margin: false")

    def loss(self, model, batch):
        b = batch["chosen_input_ids"].shape[0]
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])            # (2B, T)
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        r = rewards(model, ids, mask)
        rc, rr = r[:b], r[b:]
        losses = reward_loss(rc, rr, batch.get("margin") if self.cfg.margin else None, self.cfg.center_rewards)
        d = (rc - rr).detach()
        extra = {"correct": (d > 0).float().sum() + 0.5 * (d == 0).float().sum(), "margin": d.sum(),
                 "rewards/chosen": rc.detach().sum(), "rewards/rejected": rr.detach().sum()}
        return losses.sum(), b, extra
