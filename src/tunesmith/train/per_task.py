"""Evaluation of a ``data.mixture`` run task by task: ``tasks/NAME/METRIC`` beside the overall metrics.

Each task's validation set is evaluated on its own (``train.eval_batches`` applies per task). The
overall loss and the objective's means (accuracy, margin, ...) are the means over every evaluated item
of every task, exactly as one pass over their union would give; the records-based metrics of
``train.eval_metrics`` (accuracy, f1, ...) are computed once more on the union of the records, and the
generation metrics are the item-weighted mean of the tasks' values.
"""
from __future__ import annotations

from ..eval import metrics as metrics_mod
from ..eval.training import TrainingMetrics
from .loop import evaluate

PREFIX = "tasks/"


def task_key(task: str, metric: str) -> str:
    return f"{PREFIX}{task}/{metric}"


class TaskEval:
    """``__call__(model)``: the evaluation record (without step and split) of a mixture's validation."""

    def __init__(self, val_ds, objective, batches_for, *, metric_names: list[str], metric_kwargs: dict,
                 precision: str, device):
        self.tasks = val_ds.tasks
        self.objective, self.batches_for = objective, batches_for
        self.precision, self.device = precision, device
        self.per_task = {name: TrainingMetrics(metric_names, val_ds=ds, **metric_kwargs)
                         for name, ds in self.tasks.items()}
        generation = {n for n in metric_names if metrics_mod.all_metrics()[n].task == "generation"}
        self.generation = generation
        self.overall = TrainingMetrics([n for n in metric_names if n not in generation], val_ds=None, **metric_kwargs)

    def __call__(self, model) -> dict:
        out: dict = {}
        sums: dict[str, float] = {}
        total = 0
        all_records: list = []
        for name, ds in self.tasks.items():
            batches = list(self.batches_for(ds))
            n = sum(self.objective.count(b) for b in batches)
            records: list = []
            res = evaluate(model, self.objective, batches, self.precision, self.device, records=records)
            if self.per_task[name]:
                res.update(self.per_task[name].compute(model, res, records))
            all_records += records
            for k, v in res.items():
                out[task_key(name, k)] = v
                if isinstance(v, (int, float)) and (k in ("loss", "accuracy") or k in self.generation
                                                    or k not in metrics_mod.all_metrics()):
                    sums[k] = sums.get(k, 0.0) + float(v) * n
            total += n
        overall = {k: v / max(total, 1) for k, v in sums.items()}
        if self.overall:
            overall.update(self.overall.compute(model, overall, all_records))
        return {**overall, **out}
