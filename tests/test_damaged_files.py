"""Damaged adapters, deltas and checkpoints: one error naming the file and what is wrong with it
(never the library's traceback), and --resume falls back to the newest checkpoint that reads back."""
from __future__ import annotations

import json
import re
import shutil

import pytest

import tunesmith
from helpers import run_config
from tunesmith import cli
from tunesmith.errors import ConfigError, FileError
from tunesmith.train import checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny LoRA run with checkpoints at steps 1 and 2."""
    from helpers import alpaca_rows, write_jsonl
    tmp = tmp_path_factory.mktemp("damaged")
    data = write_jsonl(tmp / "train.jsonl", alpaca_rows())
    run_dir, _ = tunesmith.train(run_config(data, tmp, {"name": "lora", "r": 2}, max_steps=2, save_every=1))
    return run_dir


@pytest.fixture
def adapter(trained, tmp_path):
    path = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", path)
    return path


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_safetensors(adapter):
    truncate(adapter / "adapter_model.safetensors")
    with pytest.raises(FileError, match=re.escape(str(adapter / "adapter_model.safetensors")) +
                       r": not a readable safetensors file \(.*incomplete metadata.*\); the file is truncated or damaged"):
        tunesmith.load(adapter, device="cpu")


def test_garbage_adapter_config(adapter):
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(FileError, match=re.escape(str(adapter / "adapter_config.json")) +
                       r": not valid JSON \(Expecting property name enclosed in double quotes at line 1, column 2\)"):
        tunesmith.load(adapter, device="cpu")


def test_adapter_config_without_base_model(adapter):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    del cfg["base_model_name_or_path"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    model, _ = tunesmith.load(adapter, device="cpu")  # tunesmith.json names the base
    assert model is not None
    (adapter / "tunesmith.json").unlink()             # a plain peft adapter: nothing names it
    with pytest.raises(FileError, match=re.escape(str(adapter / "adapter_config.json")) +
                       r": field 'base_model_name_or_path' is missing; it should name the base model"):
        tunesmith.load(adapter, device="cpu")
    model, _ = tunesmith.load(adapter, base="random:llama", device="cpu")
    assert model is not None


@pytest.mark.parametrize("text, message", [
    ("\x00\x01garbage", r"not valid JSON \(Expecting value at line 1, column 1\)"),
    ('{"method": {"name": "lora"}}', r"field 'base' is missing; it should name the base model"),
    ('{"base": "random:llama", "method": "lora"}', r"field 'method' should be the method's config with its 'name'"),
])
def test_garbage_tunesmith_json(adapter, text, message):
    (adapter / "tunesmith.json").write_text(text)
    with pytest.raises(FileError, match=re.escape(str(adapter / "tunesmith.json")) + ": " + message):
        tunesmith.load(adapter, device="cpu")


def test_damaged_adapter_inside_a_run_and_through_the_cli(trained, tmp_path, capsys, monkeypatch):
    from tunesmith.models import loader
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    truncate(run / "adapter" / "adapter_model.safetensors", keep=0.01)
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the base loaded before the check"))
    with pytest.raises(FileError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        tunesmith.load(run, device="cpu")
    assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / 'adapter' / 'adapter_model.safetensors'}: ")
    assert not (tmp_path / "merged").exists()
    for target in ("peft", "vllm", "llama.cpp"):   # export reads the tensor names from the header first
        assert cli.main(["export", str(run), "--for", target, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {run / 'adapter' / 'adapter_model.safetensors'}: not a "
                                                   "readable safetensors file"), err
        assert not (tmp_path / "out").exists()


def test_damaged_delta_config(tmp_path):
    from helpers import alpaca_rows, write_jsonl
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows())
    run_dir, _ = tunesmith.train(run_config(data, tmp_path, {"name": "freeze", "layers": "last 1"}, max_steps=1))
    cfg_file = run_dir / "delta" / "delta_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != "base_model_name_or_path"}))
    with pytest.raises(FileError, match=r"delta_config.json: field 'base_model_name_or_path' is missing"):
        tunesmith.load(run_dir / "delta", device="cpu")
    cfg_file.write_text(json.dumps(cfg)[:-20])
    with pytest.raises(FileError, match=r"delta_config.json: not valid JSON"):
        tunesmith.load(run_dir, device="cpu")
    truncate(run_dir / "delta" / "delta.safetensors")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(FileError, match=r"delta.safetensors: not a readable safetensors file"):
        tunesmith.load(run_dir / "delta", device="cpu")


def test_resume_falls_back_from_a_truncated_optimizer_state(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "adapter")
    truncate(run / "checkpoints" / "step-2" / "optimizer.pt")
    with pytest.raises(FileError, match=r"step-2/optimizer.pt: cannot be read by torch.load \(.*\); the file is "
                                        r"truncated or damaged"):
        checkpoint.read(run / "checkpoints" / "step-2")
    capsys.readouterr()
    _, metrics = tunesmith.train(None, resume=run)
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and re.match(r"warning: checkpoint step-2 unreadable \(.*optimizer.pt: cannot be read "
                                           r"by torch.load .*\); resuming from step-1, the newest readable", warnings[0])
    assert metrics["status"] == "completed" and metrics["steps"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_with_no_readable_checkpoint(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "step-2" / "state.json").write_text("garbage")
    truncate(run / "checkpoints" / "step-1" / "trainable.safetensors")
    summary = (run / "summary.json").read_text()
    with pytest.raises(ConfigError, match=r"--resume .*: no checkpoint can be read back \(.*step-2/state.json: not "
                                          r"valid JSON .*; .*step-1/trainable.safetensors: not a readable"):
        tunesmith.train(None, resume=run)
    assert (run / "summary.json").read_text() == summary  # a resume that could not start changes nothing


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "adapter")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "split": "tr')   # kill -9 in the middle of a write
    _, metrics = tunesmith.train(None, resume=run)
    assert metrics["status"] == "completed"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]


def test_init_from_a_run_with_damaged_metadata(trained, tmp_path):
    from tunesmith import config as config_mod
    from helpers import alpaca_rows, write_jsonl
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows())
    cfg = config_mod.load({**run_config(data, tmp_path, {"name": "lora", "r": 2}, max_steps=1),
                           "init_from": str(tmp_path / "prev")})
    shutil.copytree(trained, tmp_path / "prev")
    (tmp_path / "prev" / "summary.json").write_text('{"status": "compl')
    with pytest.raises(FileError, match=re.escape(str(tmp_path / "prev" / "summary.json")) + ": not valid JSON"):
        tunesmith.train(cfg)
    shutil.copy(trained / "summary.json", tmp_path / "prev" / "summary.json")
    (tmp_path / "prev" / "config.yaml").write_text("method: {name: lora\n")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "prev" / "config.yaml")) + ": invalid YAML"):
        tunesmith.train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_damaged_reference_cache_is_computed_again(tmp_path, monkeypatch, capsys):
    from helpers import preference_rows, write_jsonl
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "pref.jsonl", preference_rows(8))
    cfg = {**run_config(data, tmp_path, {"name": "lora", "r": 2}, max_steps=1, batch_size=4),
           "objective": {"name": "dpo", "precompute_reference": True}}
    cfg["data"]["val_split"] = 0.0
    _, first = tunesmith.train(cfg)
    cached = list((tmp_path / "cache" / "reference").glob("*.pt"))
    assert len(cached) == 1
    truncate(cached[0])
    capsys.readouterr()
    _, again = tunesmith.train(cfg)
    err = capsys.readouterr().err
    assert re.search(re.escape(str(cached[0])) + r": cannot be read by torch.load .*; computing them again", err), err
    assert "examples computed, cached in" in err
    assert again["status"] == "completed" and again["train_loss_after"] == pytest.approx(first["train_loss_after"])
