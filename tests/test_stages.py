"""init_from, stages: chaining, replay, EWC data from the stage before, the forgetting matrix."""
from __future__ import annotations

import json

import pytest
from helpers import cls_rows, run_config, write_jsonl

import tunesmith
from tunesmith.errors import ConfigError
from tunesmith.train.forgetting import average_forgetting


def test_average_forgetting_formula():
    # R[stage][task]; forgetting of task j = max over stages before the last of R[l][j] - R[last][j]
    r = [[0.9, 0.5, 0.1],
         [0.7, 0.8, 0.2],
         [0.6, 0.6, 0.9]]
    avg, per = average_forgetting(r)
    assert per == pytest.approx([0.9 - 0.6, 0.8 - 0.6]) and avg == pytest.approx((0.3 + 0.2) / 2)
    avg, per = average_forgetting([[1.0, 3.0], [2.5, 1.0]], higher_is_better=False)   # losses
    assert per == [1.5] and avg == 1.5


def _flip(rows):
    return [{"text": r["text"].replace("film", "play"), "label": 1 - r["label"]} for r in rows]


def test_init_from_continues_the_earlier_run(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", cls_rows(24))
    cfg = run_config(data, tmp_path, {"name": "lora", "r": 2}, model="random:bert", objective="cls", max_steps=3)
    first, s1 = tunesmith.train(cfg)
    again = {**cfg, "init_from": str(first), "output": {"dir": str(tmp_path / "b"), "plot": False}}
    second, s2 = tunesmith.train(again)
    # the second run starts where the first ended: its loss before training is the first's after
    assert s2["train_loss_before"] == pytest.approx(s1["train_loss_after"], rel=1e-5)
    assert s2["train_loss_before"] != pytest.approx(s1["train_loss_before"], rel=1e-3)
    with pytest.raises(ConfigError, match="that run trained method 'lora', this one 'full'"):
        tunesmith.train({**again, "method": {"name": "full"}})
    with pytest.raises(ConfigError, match="no config.yaml"):
        tunesmith.train({**again, "init_from": str(tmp_path / "nowhere")})


def test_stages_chain_with_replay_and_ewc_and_write_the_matrix(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", cls_rows(30))
    b = write_jsonl(tmp_path / "b.jsonl", _flip(cls_rows(30, seed=5)))
    base = run_config(a, tmp_path, {"name": "full"}, model="random:bert", objective="cls", max_steps=2)
    base.pop("data")
    base["data"] = {"val_split": 0.2}
    base["output"]["dir"] = str(tmp_path / "seq")
    base["stages"] = [{"name": "A", "data": {"train": str(a)}},
                      {"name": "B", "data": {"train": str(b)}, "replay": {"fraction": 0.5},
                       "strategies": [{"name": "ewc", "lambda": 10.0, "fisher_examples": 4}]}]
    results = tunesmith.train(base)
    assert [r.run_dir.name for r in results] == ["A", "B"]
    cfg_b = (results[1].run_dir / "config.yaml").read_text()
    assert f"init_from: {results[0].run_dir}" in cfg_b
    assert "fraction: 0.5" in cfg_b and str(a) in cfg_b          # replay of A's examples, and EWC on A's data
    steps = [json.loads(l) for l in (results[1].run_dir / "metrics.jsonl").read_text().splitlines()
             if '"split": "train"' in l]
    assert all("ewc/weighted_sq_distance" in r for r in steps)
    out = json.loads((tmp_path / "seq" / "forgetting.json").read_text())
    assert out["tasks"] == ["A", "B"] and out["metric"] == "accuracy" and len(out["matrix"]) == 2
    m = out["matrix"]
    assert out["average_forgetting"] == pytest.approx(m[0][0] - m[1][0])
    assert (tmp_path / "seq" / "forgetting.png").is_file() and "| A |" in (tmp_path / "seq" / "forgetting.md").read_text()
    # the same command again: both stages are found completed, nothing is trained or written anew
    again = tunesmith.train(base)
    assert [r.run_dir for r in again] == [r.run_dir for r in results]
    assert sorted(p.name for p in (tmp_path / "seq").iterdir() if p.is_dir()) == ["A", "B"]
    # a stage stopped after its last checkpoint is resumed from it, in its own directory
    summary = results[1].run_dir / "summary.json"
    summary.write_text(summary.read_text().replace('"status": "completed"', '"status": "failed"'))
    resumed = tunesmith.train(base)
    assert [r.run_dir for r in resumed] == [r.run_dir for r in results]
    assert json.loads(summary.read_text())["status"] == "completed"


def test_bad_stage_fails_before_any_training(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", cls_rows(10))
    base = run_config(a, tmp_path, {"name": "full"}, model="random:bert", objective="cls")
    base["stages"] = [{"name": "A"}, {"name": "B", "train": {"lr": -1}}]
    with pytest.raises(ConfigError, match=r"stages\[1\] \(B\): train.lr"):
        tunesmith.train(base)
    assert not (tmp_path / "run").exists()
    base["stages"] = [{"name": "A", "replay": {"fraction": 0.1, "count": 3}}]
    with pytest.raises(ConfigError, match=r"stages\[0\] \(A\): replay"):
        tunesmith.train(base)


@pytest.mark.parametrize("name", ["continual_sst2_dolly", "continual_sst2_dolly_replay", "continual_sst2_dolly_ewc",
                                  "domain_pt_sft", "dann_sst2_length", "mixture_sst2_dolly", "mixture_dolly_alpaca"])
def test_example_configs_validate(name):
    from pathlib import Path

    from tunesmith import config as config_mod
    from tunesmith.train import stages
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml"
    data = config_mod.load_yaml(path)
    if stages.is_staged(data):
        for i, (stage, merged, _) in enumerate(stages._stage_dicts(data, str(path))):
            config_mod.validate(merged, f"{path} stages[{i}] ({stage})")
    else:
        config_mod.validate(data, str(path))


def test_pretraining_then_sft_chain_carries_the_adapter(tmp_path):
    from helpers import alpaca_rows
    text = write_jsonl(tmp_path / "domain.jsonl", [{"text": f"{r['instruction']} {r['output']}"} for r in alpaca_rows(16)])
    sft = write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(16, seed=3))
    base = run_config(text, tmp_path, {"name": "lora", "r": 2}, max_steps=1)
    base.pop("data")
    base["output"]["dir"] = str(tmp_path / "da")
    base["stages"] = [{"name": "pt", "data": {"train": str(text), "format": "text"}, "train": {"objective": "pt"}},
                      {"name": "sft", "data": {"train": str(sft)}, "train": {"objective": "sft"}}]
    pt, ft = tunesmith.train(base)
    assert (ft.run_dir / "adapter").is_dir() and f"init_from: {pt.run_dir}" in (ft.run_dir / "config.yaml").read_text()
    assert not (tmp_path / "da" / "forgetting.json").exists()     # different objectives: no matrix
    assert json.loads((tmp_path / "da" / "stages.json").read_text())["stages"][1]["name"] == "sft"
