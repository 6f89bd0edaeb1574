"""The objective: section: validated by the objective's own config, train.objective as its shorthand,
the objectives' declarations read by the data pipeline and the speed checks, torch-free."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tunesmith
from helpers import run_config
from tunesmith import config as config_mod
from tunesmith.errors import ConfigError
from tunesmith.train import objectives

SRC = Path(__file__).resolve().parents[2] / "src"


def _cfg(tmp_path, **extra):
    data = run_config(tmp_path / "x.jsonl", tmp_path, {"name": "lora"})
    data.update(extra)
    return data


def test_train_objective_is_a_shorthand_for_the_section(tmp_path):
    short = _cfg(tmp_path)
    short["train"]["objective"] = "dpo"
    cfg = config_mod.load(short)
    assert cfg.objective.name == "dpo" and cfg.objective.beta == 0.1 and cfg.train.objective == "dpo"
    full = config_mod.load(_cfg(tmp_path, objective={"name": "dpo", "beta": 0.3, "loss_type": "ipo"}))
    assert full.train.objective == "dpo" and full.objective.loss_type == "ipo"
    again = config_mod.load(yaml.safe_load(config_mod.dump(full)))        # the saved config reads back
    assert again.objective == full.objective
    assert config_mod.load(_cfg(tmp_path)).objective is None             # auto: from the data format


@pytest.mark.parametrize("section, message", [
    ({"name": "dpo", "betta": 1}, "objective.betta: unknown key 'betta' (did you mean 'beta'?); valid keys for "
                                  "objective dpo: name, beta, precompute_reference, loss_type"),
    ({"name": "dpo", "beta": -1}, "objective.beta: Input should be greater than 0"),
    ({"name": "dpo", "loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to loss_type sigmoid"),
    ({"name": "dpoo"}, "objective.name: unknown objective 'dpoo' (did you mean 'dpo'?)"),
])
def test_bad_sections_name_the_field(tmp_path, section, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_mod.load(_cfg(tmp_path, objective=section))


def test_shorthand_and_section_must_agree(tmp_path):
    data = _cfg(tmp_path, objective={"name": "rm"})
    data["train"]["objective"] = "dpo"
    with pytest.raises(ConfigError, match="train.objective 'dpo' and objective.name 'rm' differ"):
        config_mod.load(data)
    with pytest.raises(ConfigError, match="override 'objective.beta=2'"):
        config_mod.load(_cfg(tmp_path, objective="rm"), ["objective.beta=2"])


def test_every_objective_declares_what_it_needs():
    from tunesmith.data.tokenize import SHAPES
    for name, cfg in objectives.all_configs().items():
        assert cfg.tokenized in SHAPES, name
        assert set(cfg.default_for) <= set(cfg.formats), name
        assert cfg.task in objectives.TASKS, name


def test_speed_checks_read_the_declarations(tmp_path, alpaca_file, cls_file):
    cfg = run_config(cls_file, tmp_path, {"name": "lora"}, padding_free=True)
    with pytest.raises(ConfigError, match=r"packed rows \(dpo, orpo, pt, sft, simpo\), not 'cls'"):
        tunesmith.train(cfg)
    assert not (tmp_path / "run").exists()


def test_objective_configs_import_no_torch():
    probe = ("import sys\nfrom tunesmith.train import objectives\nobjectives.all_configs()\n"
             "from tunesmith import config\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(SRC)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"
