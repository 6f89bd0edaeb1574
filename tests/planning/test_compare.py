"""tunesmith compare on a tiny random model: every row, a failing method's error, reuse of finished runs."""
import json

import pytest

from helpers import run_config
from tunesmith import cli, config as config_mod
from tunesmith.planning import compare


def _config(tmp_path, cls_file):
    cfg = run_config(cls_file, tmp_path, {"name": "lora", "r": 2}, model="random:bert", max_steps=3,
                     objective="cls", eval_every=3)
    cfg["data"]["val_split"] = 0.25
    path = tmp_path / "base.yaml"
    path.write_text(config_mod.dump(config_mod.validate(cfg)))
    return path


@pytest.mark.slow
def test_compare_table_plots_failure_and_reuse(tmp_path, cls_file, capsys, monkeypatch):
    path, out = _config(tmp_path, cls_file), tmp_path / "cmp"
    # qlora's child process finds no bitsandbytes: its run fails with the reason, the other two still run
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('bitsandbytes is shadowed by the test')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    argv = ["compare", str(path), "--methods", "lora,bitfit,qlora", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "bitfit", "qlora"]
    lora, bitfit, qlora = rows
    assert lora["status"] == bitfit["status"] == "completed" and qlora["status"] == "failed"
    assert "bitsandbytes" in qlora["error"]
    assert lora["metric_name"] == "accuracy" and 0 <= lora["metric"] <= 1
    assert lora["lr"] == 1e-3 and bitfit["lr"] == 3e-3                # each method at its own default
    assert lora["head_lr"] == bitfit["head_lr"] == 3e-2                # and its classification head at its own
    assert 0 < lora["trainable_pct"] < 100 and lora["artifact_bytes"] > 0 and lora["peak_memory_gib"] > 0
    summary = json.loads((out / "runs" / "lora" / "summary.json").read_text())
    assert lora["trainable_params"] == summary["trainable_params"]
    for png in ("metric_vs_trainable.png", "losses.png", "memory.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "compare.md").read_text()
    assert "| `qlora` |" in md and "failed:" in md and "| `lora` | 0.001 (head 0.03) |" in md
    # a second call reuses the completed runs and retries only the failed one
    mtime = (out / "runs" / "lora" / "summary.json").stat().st_mtime
    assert cli.main(argv[:3] + ["lora,bitfit", "--out", str(out)]) == 0
    assert (out / "runs" / "lora" / "summary.json").stat().st_mtime == mtime
    assert all(r["reused"] for r in json.loads((out / "compare.json").read_text()))


def test_methods_spec_errors():
    import pytest
    from tunesmith.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*lora"):
        compare.parse_methods("lora,lorra")
    with pytest.raises(ConfigError, match="named twice"):
        compare.parse_methods("lora,lora")
    from tunesmith.methods.qlora import Qlora
    assert ("qlora" in compare.parse_methods("all")) == Qlora.available()   # bitsandbytes and a 4-bit backend
