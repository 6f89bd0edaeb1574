"""Sequence classification: cross-entropy of the task head's logits against the label."""
from __future__ import annotations

import math

import torch.nn.functional as F

from . import Objective, register


@register
class Classification(Objective):
    name = "cls"
    summary = "Sequence classification with a task head (encoders and decoders)."
    task = "classification"
    data_objective = "cls"
    formats = ("classification",)
    eval_tasks = ("classification",)

    def count(self, batch):
        return int(batch["label"].numel())

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = F.cross_entropy(logits, batch["label"], reduction="sum")
        predicted = logits.argmax(-1)
        correct = (predicted == batch["label"]).sum().item()
        records = [{"label": y, "prediction": p} for y, p in zip(batch["label"].tolist(), predicted.tolist())]
        return loss, self.count(batch), {"correct": correct, "records": records}

    def uniform_loss(self, model):
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        return math.log(labels) if labels and labels > 1 else None
