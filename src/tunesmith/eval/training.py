"""The metrics of ``train.eval_metrics``, computed at each evaluation during training.

The evaluation loop (``train.loop.evaluate``) hands over the loss and the per-item records the
objective returns in its extras under ``"records"`` (classification: label and predicted class
ids; any objective may add its own, with the keys of :mod:`tunesmith.eval.metrics`). Language-model
metrics read the mean loss; generation metrics (sft runs) decode the validation prompts greedily
through the engine, the reference being each example's first trained span. Which metrics an
objective allows follows its ``eval_tasks``.
"""
from __future__ import annotations

from ..errors import ConfigError
from . import metrics as metrics_mod

DEFAULTS = {"classification": ["accuracy", "f1"]}   # computed when train.eval_metrics is unset
IGNORE = -100


def resolve(names: list[str] | None, objective) -> list[str]:
    """The metrics an evaluation computes for ``objective``; ConfigError naming train.eval_metrics."""
    tasks = tuple(getattr(objective, "eval_tasks", ("lm",)))
    if names is None:
        return [n for t in tasks for n in DEFAULTS.get(t, [])]
    return metrics_mod.check(names, where="train.eval_metrics", allowed_tasks=tasks)


def split_example(ex: dict) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) of a tokenized sft example: everything before its first trained token,
    and that trained span; None when it has no prompt."""
    labels = ex["labels"]
    start = next((i for i, x in enumerate(labels) if x != IGNORE), None)
    if not start:
        return None
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
    return ex["input_ids"][:start], ex["input_ids"][start:end]


class TrainingMetrics:
    """Computes ``names`` for one run: ``compute(model, result, records)`` at each evaluation."""

    def __init__(self, names: list[str], *, tokenizer, val_ds, label_names: list[str] | None, limit: int | None,
                 batch_size: int, precision: str, device):
        self.names, self.tok, self.labels = names, tokenizer, label_names
        self.batch_size, self.precision, self.device = batch_size, precision, device
        self.by_task = {t: [n for n in names if metrics_mod.all_metrics()[n].task == t] for t in metrics_mod.tasks()}
        self.prompts: list = []
        if self.by_task.get("generation") and val_ds is not None:
            n = len(val_ds) if limit is None else min(len(val_ds), limit)
            pairs = [split_example(val_ds[i]) for i in range(n)]
            self.prompts = [p for p in pairs if p is not None]
            if not self.prompts:
                raise ConfigError("train.eval_metrics: generation metrics need validation examples with a prompt "
                                  "before the answer (alpaca or messages data)")

    def __bool__(self) -> bool:
        return bool(self.names)

    def compute(self, model, result: dict, records: list[dict]) -> dict:
        out: dict = {}
        if self.by_task.get("lm") and "loss" in result:
            lm = [{"loss_sum": result["loss"], "tokens": 1}]   # the loss is already the mean over the items
            out.update(metrics_mod.compute(self.by_task["lm"], lm))
        if self.by_task.get("classification") and records:
            named = [{"label": self._name(r["label"]), "prediction": self._name(r["prediction"])} for r in records]
            out.update(metrics_mod.compute(self.by_task["classification"], named, labels=self.labels))
        if self.by_task.get("preference") and records:
            out.update(metrics_mod.compute(self.by_task["preference"], records))
        if self.by_task.get("generation"):
            out.update(metrics_mod.compute(self.by_task["generation"], self._generate(model)))
        return out

    def _name(self, i):
        return self.labels[i] if self.labels and isinstance(i, int) else str(i)

    def _generate(self, model) -> list[dict]:
        import torch
        from ..infer.engine import Engine, SamplingParams
        from ..train.loop import autocast
        longest = max(len(ref) for _, ref in self.prompts)
        params = SamplingParams(max_tokens=min(256, longest + 16), temperature=0.0)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.precision):
                engine = Engine(model, self.tok, max_batch=self.batch_size, fast=False)
                done = engine.generate([list(p) for p, _ in self.prompts], params=params)
        finally:
            model.train(was_training)
        return [{"reference": self.tok.decode(ref, skip_special_tokens=True).strip(), "prediction": c.text.strip()}
                for (_, ref), c in zip(self.prompts, done)]
