"""train.eval_metrics: computed at each evaluation, in metrics.jsonl, the summary and loss.png."""
from __future__ import annotations

import json

import pytest

import tunesmith
from helpers import alpaca_rows, cls_rows, run_config, write_jsonl
from tunesmith import cli
from tunesmith.errors import ConfigError


def evals(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "eval"]


def test_classification_reports_macro_f1_by_default_and_tunesmith_eval_agrees(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", cls_rows(32))
    val = write_jsonl(tmp_path / "val.jsonl", cls_rows(12, seed=3))
    cfg = run_config(train, tmp_path, {"name": "lora", "r": 2}, model="random:bert", max_steps=3, eval_every=2)
    cfg["data"]["validation"] = str(val)
    cfg["output"]["plot"] = True
    run, summary = tunesmith.train(cfg)
    rows = evals(run)
    assert [r["step"] for r in rows] == [0, 2, 3]
    assert all({"accuracy", "f1_macro", "f1_micro", "f1_per_class"} <= set(r) for r in rows)
    assert summary["eval_f1_macro_after"] == rows[-1]["f1_macro"]
    assert (run / "loss.png").stat().st_size > 1000
    out = tmp_path / "ev"
    assert cli.main(["eval", str(run), "--data", str(val), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())["metrics"]
    assert res["accuracy"] == pytest.approx(rows[-1]["accuracy"])
    assert res["f1_macro"] == pytest.approx(rows[-1]["f1_macro"])
    assert res["f1_per_class"] == pytest.approx(rows[-1]["f1_per_class"])


def test_sft_generation_metrics_at_each_evaluation(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))
    cfg = run_config(train, tmp_path, {"name": "lora", "r": 2}, max_steps=2, eval_every=1, eval_batches=1,
                     batch_size=2, eval_metrics=["perplexity", "rouge", "exact_match"])
    run, summary = tunesmith.train(cfg)
    rows = evals(run)
    assert len(rows) == 3
    for r in rows:
        assert r["perplexity"] == pytest.approx(2.718281828 ** r["loss"], rel=1e-6)
        assert 0 <= r["rouge1"] <= 1 and 0 <= r["exact_match"] <= 1
    assert summary["eval_metrics_after"]["rougeL"] == rows[-1]["rougeL"]


def test_a_metric_the_objective_cannot_compute_is_refused_before_the_run(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8))
    cfg = run_config(train, tmp_path, {"name": "lora"}, eval_metrics=["f1"])
    with pytest.raises(ConfigError, match="train.eval_metrics: metric 'f1' is for classification evaluation"):
        tunesmith.train(cfg)
    assert not (tmp_path / "run").exists()
    cfg["train"]["eval_metrics"] = ["rogue"]
    with pytest.raises(ConfigError, match=r"unknown metric 'rogue' \(did you mean 'rouge'\?\)"):
        tunesmith.train(cfg)
