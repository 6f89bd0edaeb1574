"""Bad input gets one clear error naming the file, line, field or value and what would be valid."""
from __future__ import annotations

import pytest

import tunesmith
from helpers import alpaca_rows, run_config, write_jsonl
from tunesmith import cli
from tunesmith.data import DataError
from tunesmith.errors import ConfigError, ModelError


def _train(cfg):
    return tunesmith.train(cfg)


def test_malformed_jsonl_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        _train(run_config(f, tmp_path, {"name": "lora"}))


def test_missing_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:2.*output"):
        _train(run_config(f, tmp_path, {"name": "lora"}, **{}) | {"data": {"train": str(f), "format": "alpaca"}})


def test_wrong_type(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": 5}])
    with pytest.raises(DataError, match=r"d.jsonl:1.*output.*int"):
        _train(run_config(f, tmp_path, {"name": "lora"}))


def test_empty_dataset(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl"):
        _train(run_config(f, tmp_path, {"name": "lora"}))


def test_unknown_method(alpaca_file, tmp_path):
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'lorra'.*did you mean 'lora'.*valid:"):
        _train(run_config(alpaca_file, tmp_path, {"name": "lorra"}))


def test_misspelled_config_key(alpaca_file, tmp_path):
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora"})
    cfg["train"]["lrr"] = 1e-3
    with pytest.raises(ConfigError, match=r"train.lrr: unknown key 'lrr' \(did you mean 'lr'\?\)"):
        _train(cfg)
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora", "rank": 4})
    with pytest.raises(ConfigError, match=r"method.rank: unknown key"):
        _train(cfg)


def test_bad_value_names_field_and_value(alpaca_file, tmp_path):
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora", "r": 0})
    with pytest.raises(ConfigError, match=r"method.r: .*greater than or equal to 1.*got 0"):
        _train(cfg)
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora"}, scheduler="cosin")
    with pytest.raises(ConfigError, match=r"train.scheduler: .*'constant', 'linear', 'cosine', .*'warmup_stable_decay'.*got 'cosin'"):
        _train(cfg)


def test_model_path_that_does_not_exist(alpaca_file, tmp_path):
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora"}, model="/no/such/model")
    with pytest.raises(ModelError, match=r"model.name_or_path: '/no/such/model' does not exist"):
        _train(cfg)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_unknown_target_module(alpaca_file, tmp_path):
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora", "target_modules": ["qproj"]})
    with pytest.raises(ConfigError, match=r"method.target_modules: \['qproj'\] matches no.*q_proj"):
        _train(cfg)


def test_cli_prints_one_line_and_exits_2(alpaca_file, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: 'random:llama'}}\nmethod: {{name: lora}}\ndata: {{train: {alpaca_file}}}\n"
                   f"train: {{max_steps: 1, progress: false}}\noutput: {{dir: {tmp_path / 'r'}}}\n")
    assert cli.main(["train", str(cfg), "train.lr=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0] and "'abc'" in err[0]
    assert cli.main(["train", str(cfg), "trian.lr=1"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_section_and_bad_yaml(tmp_path, alpaca_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        tunesmith.train(bad)
    with pytest.raises(ConfigError, match=r"unknown section 'optim'"):
        tunesmith.train({"optim": {}, "method": "lora", "data": {"train": str(alpaca_file)}})


def test_on_error_skip_counts_bad_rows(tmp_path):
    rows = alpaca_rows(20) + [{"instruction": "x"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = run_config(f, tmp_path, {"name": "lora"}, max_steps=1)
    cfg["data"].update(format="alpaca", on_error="skip")
    _, m = tunesmith.train(cfg)
    assert m["data_skipped"] == 1 and "d.jsonl:21" in m["data_skipped_reasons"][0]
