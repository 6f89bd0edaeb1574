"""The command line: methods listing, train with overrides, resume and merge."""
from __future__ import annotations

import json

from tunesmith import cli
from tunesmith.methods import registry


def test_methods_lists_every_registered_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in out]
    assert names == list(registry.all_methods())
    for line, cls in zip(out, registry.all_methods().values()):
        assert cls.family in line and cls.summary in line
    prefix = next(line for line in out if line.startswith("prefix "))
    assert "lr 0.0003" in prefix and "head 0.03" in prefix      # the method's pair of default rates


def test_train_with_overrides_then_resume_then_merge(alpaca_file, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: 'random:llama', device: cpu}}\nmethod: {{name: lora}}\n"
                   f"data: {{train: {alpaca_file}}}\ntrain: {{max_steps: 2, progress: false}}\n"
                   f"output: {{dir: {tmp_path / 'run'}}}\n")
    assert cli.main(["train", str(cfg), "method.r=2", "train.max_steps=3", "train.save_every=1"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert cli.main(["train", "--resume", str(run), "train.max_steps=5"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 5
    assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file() or (tmp_path / "merged" / "vocab.txt").is_file()


def test_env_prints_what_a_bug_report_needs(capsys):
    import platform
    import re
    from importlib.metadata import version
    assert cli.main(["env"]) == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    for pkg in ("tunesmith", "torch", "transformers", "peft"):
        assert rows[pkg] == version(pkg)
    assert rows["python"] == platform.python_version()
    assert rows["bitsandbytes"] and rows["liger-kernel"]  # a version, or "not installed"
    assert "gpu" in rows or "gpu 0" in rows
