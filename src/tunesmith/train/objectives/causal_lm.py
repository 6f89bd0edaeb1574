"""Causal language-modelling loss: next-token cross-entropy on unmasked labels (sft and pt)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Objective, register


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy; logits (B, T, V), labels (B, T) with -100 = ignored."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)                               # (B*(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


class CausalLM(Objective):
    task = "causal_lm"

    def count(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return token_ce_sum(out.logits, batch["labels"]), self.count(batch), {}


@register
class SFT(CausalLM):
    name = "sft"
    summary = "Supervised fine-tuning: loss on response tokens only (prompts masked)."
    data_objective = "sft"
    formats = ("alpaca", "messages", "sharegpt")


@register
class Pretrain(CausalLM):
    name = "pt"
    summary = "Continued pre-training: loss on every token of raw text (packed)."
    data_objective = "pt"
    formats = ("text",)
