"""Each metric against scikit-learn, rouge-score and sacrebleu called directly on the same records."""
from __future__ import annotations

import math
import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn import metrics as skm

from tunesmith.errors import ConfigError
from tunesmith.eval import metrics, tasks
from tunesmith.eval.metrics import INVALID, compute, final_answer


def cls_records(n=60, seed=0, none_every=9):
    rng = random.Random(seed)
    names = ["ant", "bee", "cat"]
    recs = []
    for i in range(n):
        label = rng.choice(names)
        pred = label if rng.random() < 0.6 else rng.choice(names)
        recs.append({"label": label, "prediction": None if i % none_every == 0 else pred})
    return recs, names


def test_classification_equals_sklearn():
    recs, names = cls_records()
    got = compute(["accuracy", "precision", "recall", "f1", "confusion_matrix"], recs, labels=names)
    y_true = [r["label"] for r in recs]
    y_pred = [r["prediction"] or INVALID for r in recs]
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert got["no_label"] == sum(r["prediction"] is None for r in recs) > 0
    for key, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        for avg in ("macro", "micro"):
            assert got[f"{key}_{avg}"] == pytest.approx(fn(y_true, y_pred, labels=names, average=avg, zero_division=0))
        per = fn(y_true, y_pred, labels=names, average=None, zero_division=0)
        assert list(got[f"{key}_per_class"].values()) == pytest.approx(list(per))
        assert list(got[f"{key}_per_class"]) == names
    assert got["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=names).tolist()


def test_macro_f1_shows_a_class_never_predicted():
    recs = [{"label": "a", "prediction": "a"}] * 9 + [{"label": "b", "prediction": "a"}]
    got = compute(["accuracy", "f1"], recs, labels=["a", "b"])
    assert got["accuracy"] == pytest.approx(0.9)
    assert got["f1_per_class"]["b"] == 0.0
    assert got["f1_macro"] == pytest.approx(skm.f1_score(["a"] * 9 + ["b"], ["a"] * 10, average="macro"))
    assert got["f1_macro"] < 0.5


def gen_records():
    refs = ["The cat sat on the mat.", "Paris is the capital of France.", "Two plus two is four.",
            "Rivers flow to the sea", "#### 1,250"]
    preds = ["the cat is sitting on a mat", "Paris is the capital of France.", "2 + 2 = 4, so the answer is four",
             "rivers  flow to the sea.", "so she pays 1250 dollars\n#### 1250"]
    return [{"reference": r, "prediction": p} for r, p in zip(refs, preds)]


def test_generation_equals_rouge_score_and_sacrebleu():
    recs = gen_records()
    got = compute(["rouge", "bleu", "exact_match"], recs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r["reference"], r["prediction"]) for r in recs]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(sum(s[k].fmeasure for s in scores) / len(scores))
    bleu = sacrebleu.corpus_bleu([r["prediction"] for r in recs], [[r["reference"] for r in recs]]).score
    assert got["bleu"] == pytest.approx(bleu)
    assert got["exact_match"] == pytest.approx(2 / 5)   # the copy, and the one differing in case, spaces, a dot


def test_gsm8k_final_answers():
    assert final_answer("so 16 - 3 = 13\n#### 1,250") == "1250"
    assert final_answer("The answer is 18.") == "18"
    assert final_answer("#### 4.50") == "4.5"
    assert final_answer("#### 7.0") == "7"
    assert final_answer("no number") is None
    recs = [{"reference": "x\n#### 18", "prediction": "She makes $18 a day."},
            {"reference": "#### 3", "prediction": "#### 3 apples, not 4"},
            {"reference": "#### 5", "prediction": "It is 50."}]
    assert compute(["gsm8k"], recs)["gsm8k_accuracy"] == pytest.approx(2 / 3)


def test_lm_and_preference():
    recs = [{"loss_sum": 6.0, "tokens": 3}, {"loss_sum": 2.0, "tokens": 1}]
    got = compute(["loss", "perplexity"], recs)
    assert got["loss"] == pytest.approx(2.0) and got["perplexity"] == pytest.approx(math.exp(2.0))
    pairs = [{"chosen_reward": 1.0, "rejected_reward": 0.5}, {"chosen_reward": -1.0, "rejected_reward": 0.0}]
    got = compute(["reward_accuracy", "reward_margin"], pairs)
    assert got == {"reward_accuracy": 0.5, "reward_margin": pytest.approx(-0.25)}


def test_registry_is_consistent_and_errors_name_the_valid_metrics():
    names = metrics.all_metrics()
    assert set(metrics.tasks()) <= set(tasks.all_tasks())
    for t in tasks.all_tasks():
        assert metrics.defaults(t), t
    assert {"rouge", "bleu", "exact_match", "gsm8k", "f1", "accuracy", "perplexity", "reward_accuracy"} <= set(names)
    with pytest.raises(ConfigError, match=r"unknown metric 'rogue' \(did you mean 'rouge'\?\)"):
        metrics.check(["rogue"], "generation")
    with pytest.raises(ConfigError, match="metric 'f1' is for classification evaluation, not generation"):
        metrics.check(["f1"], "generation")
