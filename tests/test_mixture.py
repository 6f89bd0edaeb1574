"""data.mixture: quotas by weights and temperature, determinism, task tags, per-task metrics, bad entries."""
from __future__ import annotations

import json

import pytest
from helpers import alpaca_rows, cls_rows, run_config, write_jsonl

import tunesmith
from tunesmith import config as config_mod
from tunesmith.data import DataError, build_datasets
from tunesmith.data.mixture import quotas
from tunesmith.data.mixture_config import MixtureEntry
from tunesmith.errors import ConfigError
from tunesmith.models.loader import ModelConfig, load_tokenizer


def _entries(*specs):
    return [MixtureEntry(train=f"{i}.jsonl", **s) for i, s in enumerate(specs)]


def test_quotas_weights_temperature_concat_count_fraction():
    sizes = [300, 100]
    # weights: p = (3/4, 1/4) of 400
    assert quotas(_entries({"weight": 3}, {"weight": 1}), sizes, "weights", 1.0) == [300, 100]
    assert quotas(_entries({"weight": 1}, {"weight": 1}), sizes, "weights", 1.0) == [200, 200]
    # temperature T: p_i = n_i^(1/T) / sum; T = 2: sqrt(300) / (sqrt(300) + sqrt(100)) of 400 = 253.6 -> 254
    p0 = 300 ** 0.5 / (300 ** 0.5 + 100 ** 0.5)
    q = quotas(_entries({}, {}), sizes, "temperature", 2.0)
    assert q == [round(p0 * 400), 400 - round(p0 * 400)] and sum(q) == 400
    assert quotas(_entries({}, {}), sizes, "temperature", 1.0) == [300, 100]
    assert quotas(_entries({}, {}), sizes, "concat", 1.0) == [300, 100]
    # count / fraction are exact; weight 0 is evaluated only
    assert quotas(_entries({"count": 7}, {"fraction": 0.25}), sizes, "weights", 1.0) == [7, 25]
    assert quotas(_entries({}, {"weight": 0}), sizes, "weights", 1.0) == [300, 0]


def _tok():
    return load_tokenizer(ModelConfig(name_or_path="random:llama"))


def _mixture_data(tmp_path, **extra):
    a = write_jsonl(tmp_path / "add.jsonl", alpaca_rows(30, seed=1))
    b = write_jsonl(tmp_path / "say.jsonl", [{"instruction": f"Say {w}.", "output": w}
                                             for w in ["red", "green", "blue", "cat", "dog", "sun"] * 4])
    return {"mixture": [{"train": str(a), "weight": 3}, {"train": str(b), "task": "say", "tag": "[say]", **extra}],
            "val_split": 0.2}


def test_mixture_is_deterministic_and_tags_the_prompt(tmp_path):
    cfg = config_mod.validate({"method": "lora", "data": _mixture_data(tmp_path)}).data
    tok = _tok()
    a = build_datasets(cfg, tok, max_seq_len=64, objective="sft", seed=3)
    b = build_datasets(cfg, tok, max_seq_len=64, objective="sft", seed=3)
    c = build_datasets(cfg, tok, max_seq_len=64, objective="sft", seed=4)
    assert [ex["input_ids"] for ex in a[0]] == [ex["input_ids"] for ex in b[0]]
    assert [ex["input_ids"] for ex in a[0]] != [ex["input_ids"] for ex in c[0]]
    train, val, report = a
    n_add, n_say = 24, round(24 * 0.8)   # 30 - 6 and 24 - 5 (val_split 0.2) before mixing
    assert report.quotas == {"add": round(0.75 * (n_add + n_say)), "say": (n_add + n_say) - round(0.75 * (n_add + n_say))}
    assert set(val.tasks) == {"add", "say"} and len(val) == len(val.tasks["add"]) + len(val.tasks["say"])
    said = [tok.decode(ex["input_ids"]) for ex in val.tasks["say"]]
    needle = tok.decode(tok("[say]", add_special_tokens=False)["input_ids"])
    assert said and all(needle in t for t in said)
    assert not any(needle in tok.decode(ex["input_ids"]) for ex in val.tasks["add"])
    assert "mixture: add" in report.line()


def test_bad_entry_names_it(tmp_path):
    data = _mixture_data(tmp_path)
    data["mixture"][1]["train"] = str(tmp_path / "missing.jsonl")
    cfg = config_mod.validate({"method": "lora", "data": data}).data
    with pytest.raises(DataError, match=r"data\.mixture\[1\] \(say\): .*missing\.jsonl"):
        build_datasets(cfg, _tok(), max_seq_len=64, objective="sft", seed=3)
    cls = write_jsonl(tmp_path / "cls.jsonl", cls_rows(10))
    data["mixture"][1]["train"] = str(cls)
    cfg = config_mod.validate({"method": "lora", "data": data}).data
    with pytest.raises(DataError, match=r"data\.mixture\[1\] \(say\)"):
        build_datasets(cfg, _tok(), max_seq_len=64, objective="sft", seed=3)
    with pytest.raises(ConfigError, match=r"data\.mixture\[1\]\.weight"):
        config_mod.validate({"method": "lora", "data": _mixture_data(tmp_path, weight=-1)})
    with pytest.raises(ConfigError, match=r"data\.mixture\[1\]: task name 'add'"):
        config_mod.validate({"method": "lora", "data": _mixture_data(tmp_path, task="add")})


def test_run_reports_every_task_and_resumes_the_same(tmp_path):
    cfg = run_config(tmp_path / "unused", tmp_path, {"name": "lora", "r": 2}, max_steps=4, save_every=2, scheduler="constant",
                     objective="sft")
    cfg["data"] = _mixture_data(tmp_path)
    cfg["output"]["plot"] = True
    run_dir, summary = tunesmith.train(cfg)
    evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    last = evals[-1]
    assert {"tasks/add/loss", "tasks/say/loss", "loss"} <= set(last)
    # the overall loss is the token-weighted mean of the tasks' losses
    assert min(last["tasks/add/loss"], last["tasks/say/loss"]) <= last["loss"] <= max(last["tasks/add/loss"],
                                                                                      last["tasks/say/loss"])
    assert (run_dir / "loss.png").is_file()
    # resumed from step 2: the same steps' losses as the uninterrupted run
    cfg2 = {**cfg, "output": {"dir": str(tmp_path / "half"), "plot": False}, "train": {**cfg["train"], "max_steps": 2}}
    half, _ = tunesmith.train(cfg2)
    (half / "config.yaml").write_text((half / "config.yaml").read_text().replace("max_steps: 2", "max_steps: 4"))
    tunesmith.train(None, resume=half)
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                        if '"train"' in l and '"train_probe"' not in l]
    assert losses(half) == pytest.approx(losses(run_dir), rel=1e-5)
