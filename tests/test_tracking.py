"""train.report_to: a clear error when a tracker's package is missing; every metrics.jsonl record reaches
the trackers (through fake tensorboard and wandb modules: neither package is a dependency)."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from helpers import cls_rows, run_config, write_jsonl

import tunesmith
from tunesmith import config as config_mod
from tunesmith.errors import ConfigError

REAL_FIND_SPEC = importlib.util.find_spec


def pretend(monkeypatch, installed: set[str], missing: set[str] = frozenset()):
    def find_spec(name, *a, **k):
        if name in missing:
            return None
        if name in installed:
            return object()
        return REAL_FIND_SPEC(name, *a, **k)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def small(tmp_path, report_to):
    data = write_jsonl(tmp_path / "cls.jsonl", cls_rows(24))
    return run_config(data, tmp_path, {"name": "lora", "r": 2}, model="random:bert", objective="cls", max_steps=2,
                      max_seq_len=16, report_to=report_to)


@pytest.mark.parametrize("name,pip", [("tensorboard", "pip install tensorboard"), ("wandb", "pip install wandb")])
def test_a_missing_tracker_package_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch, name, pip):
    pretend(monkeypatch, set(), missing={name})
    with pytest.raises(ConfigError, match=rf"train.report_to: {name} needs the {name} package.*\({pip}\)"):
        tunesmith.train(small(tmp_path, [name]))
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"train.report_to.*'tensorbord'.*did you mean 'tensorboard'"):
        config_mod.validate({"method": "full", "data": {"train": "x"}, "train": {"report_to": ["tensorbord"]}})


def test_records_reach_tensorboard_and_wandb(tmp_path, monkeypatch):
    events, runs = [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            events.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            events.append((key, value, step))

        def add_text(self, *a):
            pass

        def close(self):
            events.append(("closed",))

    class Run:
        def __init__(self, **kw):
            self.kw, self.logged, self.finished = kw, [], False
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = SummaryWriter
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: Run(**kw)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    pretend(monkeypatch, {"tensorboard", "wandb"})
    run_dir, summary = tunesmith.train(small(tmp_path, ["tensorboard", "wandb"]))
    assert summary["status"] == "completed"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [(f"{r['split']}/{k}", float(v), r["step"]) for r in records for k, v in r.items()
                if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert events[0] == ("dir", str(run_dir / "tensorboard")) and events[-1] == ("closed",)
    assert events[1:-1] == expected and ("train/loss", records[2]["loss"], 1) in expected
    (run,) = runs
    assert run.kw["name"] == run_dir.name and run.kw["config"]["train"]["report_to"] == ["tensorboard", "wandb"]
    assert [(s, k, v) for s, vals in run.logged for k, v in vals.items()] == [(s, k, v) for k, v, s in expected]
    assert run.finished
