"""tunesmith recommend: methods over the budget are left out with their estimate; pilots rank the rest."""
import json

import pytest

from helpers import run_config
from tunesmith import cli
from tunesmith.errors import ConfigError
from tunesmith.planning.recommend import parse_time


def test_budget_leaves_out_methods_with_their_estimate(tmp_path, cls_file, capsys):
    cfg = tmp_path / "base.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump(run_config(cls_file, tmp_path, {"name": "lora"}, model="random:bert",
                                             objective="cls")))
    out = tmp_path / "rec"
    assert cli.main(["recommend", "--config", str(cfg), "--budget", "1MiB", "--methods", "full,lora,bitfit",
                     "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "recommend.json").read_text())
    assert report["ranked"] == [] and [e["method"] for e in report["excluded"]] == ["full", "lora", "bitfit"]
    assert all("exceeds the budget 1MiB" in e["reason"] for e in report["excluded"])
    assert "Left out" in (out / "recommend.md").read_text()


def test_time_parsing():
    assert parse_time("1h") == 3600 and parse_time("30m") == 1800 and parse_time("90") == 90
    with pytest.raises(ConfigError, match="--time"):
        parse_time("soon")
