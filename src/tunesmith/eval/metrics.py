"""Evaluation metrics, registered by name: this registry is the only list of them.

A metric reads prediction records (the rows of ``predictions.jsonl``, or what an evaluation during
training collected) and returns one or more named values. The record keys each task writes:

=============== ===================================================================================
task            record keys
=============== ===================================================================================
lm              ``loss_sum`` (summed next-token cross-entropy of the row), ``tokens`` (its scored tokens)
classification  ``label``, ``prediction`` (label names; ``prediction`` is null when a generated answer
                names no label: it then counts as wrong)
generation      ``reference``, ``prediction`` (texts)
preference      ``chosen_reward``, ``rejected_reward`` (numbers)
=============== ===================================================================================

The computations are scikit-learn's (classification), rouge-score's (ROUGE-1/2/L F-measure with
Porter stemming, the mean over rows, as fractions) and sacrebleu's (corpus BLEU, 0..100); the tests
compare each metric with those libraries called directly on saved predictions. This module imports
none of them (nor torch) until a metric is computed, so configs naming metrics validate fast.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

from ..errors import ConfigError, did_you_mean

INVALID = "<no label>"   # what a generated answer naming no label is compared as


@dataclass(frozen=True)
class Metric:
    name: str
    task: str                          # lm | classification | generation | preference
    summary: str
    keys: tuple[str, ...]              # the values it returns
    fn: Callable[..., dict]
    default: bool                      # computed by `tunesmith eval` when --metrics is not given


_METRICS: dict[str, Metric] = {}


def metric(name: str, task: str, summary: str, keys: tuple[str, ...] | None = None, default: bool = True):
    """Register ``fn(records, labels=None) -> {key: value}`` as metric ``name``."""
    def wrap(fn):
        _METRICS[name] = Metric(name, task, summary, keys or (name,), fn, default)
        return fn
    return wrap


def all_metrics() -> dict[str, Metric]:
    return dict(_METRICS)


def tasks() -> list[str]:
    """The evaluation tasks, in registry order."""
    return list(dict.fromkeys(m.task for m in _METRICS.values()))


def for_task(task: str) -> list[Metric]:
    return [m for m in _METRICS.values() if m.task == task]


def check(names: list[str], task: str | None = None, where: str = "--metrics",
          allowed_tasks: tuple[str, ...] | None = None) -> list[str]:
    """``names`` validated (ConfigError naming ``where``, the value and the valid names)."""
    allowed = allowed_tasks or ((task,) if task else tuple(tasks()))
    valid = [m.name for m in _METRICS.values() if m.task in allowed]
    for n in names:
        if n not in _METRICS:
            raise ConfigError(f"{where}: unknown metric {n!r}{did_you_mean(n, _METRICS)}; valid: {', '.join(valid)}")
        if _METRICS[n].task not in allowed:
            raise ConfigError(f"{where}: metric {n!r} is for {_METRICS[n].task} evaluation, not "
                              f"{' or '.join(allowed)}; valid here: {', '.join(valid)}")
    return list(names)


def defaults(task: str) -> list[str]:
    return [m.name for m in for_task(task) if m.default]


def compute(names: list[str], records: list[dict], labels: list[str] | None = None) -> dict:
    """Every value of the metrics ``names`` over ``records`` (``labels``: class names, in order)."""
    out: dict = {}
    for n in names:
        out.update(_METRICS[n].fn(records, labels=labels))
    return out


# ---- language modelling --------------------------------------------------------------------------
def _mean_loss(records) -> float:
    tokens = sum(r["tokens"] for r in records)
    return sum(r["loss_sum"] for r in records) / max(tokens, 1)


@metric("loss", "lm", "Mean next-token cross-entropy over the scored tokens (nats).")
def _loss(records, labels=None):
    return {"loss": _mean_loss(records)}


@metric("perplexity", "lm", "exp(loss): the perplexity over the scored tokens.")
def _perplexity(records, labels=None):
    loss = _mean_loss(records)
    return {"perplexity": math.exp(loss) if loss < 700 else math.inf}


# ---- classification ------------------------------------------------------------------------------
def _y(records):
    return ([str(r["label"]) for r in records],
            [INVALID if r.get("prediction") is None else str(r["prediction"]) for r in records])


def _names(records, labels):
    return [str(x) for x in labels] if labels else sorted({str(r["label"]) for r in records})


@metric("accuracy", "classification", "Share of rows predicted correctly (scikit-learn accuracy_score); "
        "no_label: rows whose generated answer named no label.", keys=("accuracy", "no_label"))
def _accuracy(records, labels=None):
    from sklearn.metrics import accuracy_score
    y_true, y_pred = _y(records)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "no_label": sum(p == INVALID for p in y_pred)}


def _prf(which: int, key: str):
    def fn(records, labels=None):
        from sklearn.metrics import precision_recall_fscore_support
        y_true, y_pred = _y(records)
        names = _names(records, labels)
        out = {}
        for avg in ("macro", "micro"):
            out[f"{key}_{avg}"] = float(precision_recall_fscore_support(
                y_true, y_pred, labels=names, average=avg, zero_division=0)[which])
        per = precision_recall_fscore_support(y_true, y_pred, labels=names, average=None, zero_division=0)[which]
        out[f"{key}_per_class"] = {n: float(v) for n, v in zip(names, per)}
        return out
    return fn


for _i, _key, _what in ((0, "precision", "Precision"), (1, "recall", "Recall"), (2, "f1", "F1")):
    metric(_key, "classification", f"{_what} over the label set, macro- and micro-averaged and per class "
           "(scikit-learn precision_recall_fscore_support, zero_division=0).",
           keys=(f"{_key}_macro", f"{_key}_micro", f"{_key}_per_class"))(_prf(_i, _key))


@metric("confusion_matrix", "classification", "Rows: true label, columns: predicted label, in label order "
        "(scikit-learn confusion_matrix); `tunesmith eval` also draws it as confusion_matrix.png.")
def _confusion(records, labels=None):
    from sklearn.metrics import confusion_matrix
    y_true, y_pred = _y(records)
    return {"confusion_matrix": confusion_matrix(y_true, y_pred, labels=_names(records, labels)).tolist()}


# ---- generation ----------------------------------------------------------------------------------
@metric("rouge", "generation", "ROUGE-1, ROUGE-2 and ROUGE-L F-measure (rouge-score, Porter stemmer), the mean "
        "over rows, 0..1.", keys=("rouge1", "rouge2", "rougeL"))
def _rouge(records, labels=None):
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for r in records:
        scores = scorer.score(r["reference"], r["prediction"])
        for k in sums:
            sums[k] += scores[k].fmeasure
    return {k: v / max(len(records), 1) for k, v in sums.items()}


@metric("bleu", "generation", "Corpus BLEU (sacrebleu, its default 13a tokenizer), 0..100.")
def _bleu(records, labels=None):
    import sacrebleu
    preds = [r["prediction"] for r in records]
    return {"bleu": float(sacrebleu.corpus_bleu(preds, [[r["reference"] for r in records]]).score)}


def normalize_answer(text: str) -> str:
    """Lower case, surrounding punctuation and whitespace stripped, runs of whitespace made one space."""
    return " ".join(str(text).lower().split()).strip(" .,;:!?\"'")


@metric("exact_match", "generation", "Share of rows whose prediction equals the reference after lower-casing "
        "and collapsing whitespace (surrounding punctuation ignored).")
def _exact(records, labels=None):
    hits = sum(normalize_answer(r["prediction"]) == normalize_answer(r["reference"]) for r in records)
    return {"exact_match": hits / max(len(records), 1)}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """GSM8K's final answer: the number after the last ``####``, else the last number in ``text``
    (commas and a trailing ``.0`` removed); None when there is no number."""
    text = str(text)
    found = _NUMBER.findall(text.rsplit("####", 1)[1]) if "####" in text else []
    found = found[:1] or _NUMBER.findall(text)[-1:]
    if not found:
        return None
    raw = found[0].replace(",", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return raw
    return format(value.normalize(), "f") if value != value.to_integral() else str(int(value))


@metric("gsm8k", "generation", "GSM8K final-answer accuracy: the number after `####` (else the last number) of "
        "the prediction equals that of the reference.", keys=("gsm8k_accuracy",), default=False)
def _gsm8k(records, labels=None):
    hits = 0
    for r in records:
        want = final_answer(r["reference"])
        hits += want is not None and final_answer(r["prediction"]) == want
    return {"gsm8k_accuracy": hits / max(len(records), 1)}


# ---- preference ----------------------------------------------------------------------------------
@metric("reward_accuracy", "preference", "Share of pairs whose chosen response gets the higher reward.")
def _reward_accuracy(records, labels=None):
    hits = sum(r["chosen_reward"] > r["rejected_reward"] for r in records)
    return {"reward_accuracy": hits / max(len(records), 1)}


@metric("reward_margin", "preference", "Mean reward of the chosen response minus that of the rejected one.")
def _reward_margin(records, labels=None):
    return {"reward_margin": sum(r["chosen_reward"] - r["rejected_reward"] for r in records) / max(len(records), 1)}
