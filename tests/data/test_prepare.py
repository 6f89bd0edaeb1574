"""`tunesmith prepare`: the cache of an interrupted and resumed prepare is byte for byte the one of an
uninterrupted run; training reads from it exactly the batches it would have built; a changed tokenizer or
data setting is never read from a stale cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import alpaca_rows, write_jsonl

import tunesmith
from tunesmith import cli
from tunesmith import config as config_mod
from tunesmith.data import DataError, build_datasets
from tunesmith.data.prepare import prepare
from tunesmith.models.loader import ModelConfig, load_tokenizer
from tunesmith.train import objectives
from tunesmith.train.loop import Batches

SFT = objectives.build_config("sft")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="random:llama"))


def data_cfg(tmp_path, **fields):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if "train" not in fields:
        fields["train"] = str(write_jsonl(tmp_path / "train.jsonl", alpaca_rows(47)))
    return config_mod.validate({"method": "full", "data": {"cache": str(tmp_path / "cache"), **fields}}).data


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_interrupted_and_resumed_prepare_gives_the_same_bytes(tmp_path, tok):
    whole = data_cfg(tmp_path / "a")
    done = prepare(whole, tok, objective=SFT, max_seq_len=64, shard_rows=6, progress=False)
    assert done.rows == 47 and done.examples == 47 and done.shards_written == 8
    cut = data_cfg(tmp_path / "b", train=whole.train)
    with pytest.raises(KeyboardInterrupt):
        prepare(cut, tok, objective=SFT, max_seq_len=64, shard_rows=6, progress=False, stop_after=3)
    root = Path(cut.cache) / done.root.name
    assert not (root / "manifest.json").exists() and len(list((root / "train").glob("*.json"))) == 3
    (root / "train" / "shard-00003.bin").write_bytes(b"half a shard")       # killed between .bin and .json
    (root / "train" / "shard-00004.bin.tmp").write_bytes(b"half written")
    with pytest.raises(DataError, match="was interrupted; run it again"):
        build_datasets(cut, tok, max_seq_len=64, objective=SFT, seed=0)
    resumed = prepare(cut, tok, objective=SFT, max_seq_len=64, shard_rows=100, workers=2, progress=False)
    assert resumed.shards_reused == 3 and resumed.shards_written == 5   # the first run's shard size is kept
    assert tree_digest(root) == tree_digest(done.root)
    again = prepare(cut, tok, objective=SFT, max_seq_len=64, progress=False)
    assert again.shards_written == 0 and again.examples == 47


@pytest.mark.parametrize("kind", ["alpaca", "text"])
def test_training_reads_the_same_batches_from_the_cache(tmp_path, tok, kind):
    if kind == "text":
        rows = [{"text": " ".join(f"word{i * j % 17}" for j in range(5 + i % 9))} for i in range(40)]
        fields = {"train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "val_split": 0.1}
        objective = objectives.build_config("pt")
    else:
        fields, objective = {"val_split": 0.1}, SFT
    cached = data_cfg(tmp_path, **fields)
    plain = cached.model_copy(update={"cache": None})
    prepare(cached, tok, objective=objective, max_seq_len=24, shard_rows=7, progress=False)
    for seed in (0, 1):   # one cache, any seed's split
        a_train, a_val, a_rep = build_datasets(plain, tok, max_seq_len=24, objective=objective, seed=seed)
        b_train, b_val, b_rep = build_datasets(cached, tok, max_seq_len=24, objective=objective, seed=seed)
        assert [a_train[i] for i in range(len(a_train))] == [b_train[i] for i in range(len(b_train))]
        assert [a_val[i] for i in range(len(a_val))] == [b_val[i] for i in range(len(b_val))]
        assert a_rep.line() == b_rep.line() and a_rep.train_tokens == b_rep.train_tokens
        ba, bb = (Batches(d, 4, seed, 0, torch.device("cpu")) for d in (a_train, b_train))
        for k in range(2 * ba.per_epoch()):
            x, y = ba.get(k), bb.get(k)
            assert same(x, y)


def test_a_changed_tokenizer_or_setting_invalidates_the_cache(tmp_path, tok):
    cfg = data_cfg(tmp_path)
    prepare(cfg, tok, objective=SFT, max_seq_len=64, progress=False)
    build_datasets(cfg, tok, max_seq_len=64, objective=SFT, seed=0)            # reads it
    other = load_tokenizer(ModelConfig(name_or_path="random:llama"))
    other.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    with pytest.raises(DataError, match="prepared with another tokenizer or data settings.*tunesmith prepare"):
        build_datasets(cfg, other, max_seq_len=64, objective=SFT, seed=0)
    with pytest.raises(DataError, match="another tokenizer or data settings"):
        build_datasets(cfg, tok, max_seq_len=32, objective=SFT, seed=0)
    with pytest.raises(DataError, match="another tokenizer or data settings"):
        build_datasets(cfg.model_copy(update={"truncation": "left"}), tok, max_seq_len=64, objective=SFT, seed=0)
    Path(cfg.train).write_text(Path(cfg.train).read_text() + json.dumps(alpaca_rows(1, seed=5)[0]) + "\n")
    with pytest.raises(DataError, match="another tokenizer or data settings"):   # the source changed
        build_datasets(cfg, tok, max_seq_len=64, objective=SFT, seed=0)
    with pytest.raises(DataError, match="sft and pt objectives"):
        build_datasets(cfg, tok, max_seq_len=64, objective=objectives.build_config("dpo"), seed=0)


def test_prepare_command_then_train_from_the_cache(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))
    cfg = {"model": {"name_or_path": "random:llama", "device": "cpu"}, "method": {"name": "lora", "r": 2},
           "data": {"train": str(train), "cache": str(tmp_path / "cache")},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "max_seq_len": 64, "progress": False},
           "output": {"dir": str(tmp_path / "run"), "plot": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(path)]) == 2
    assert "run `tunesmith prepare CONFIG` first" in capsys.readouterr().err
    assert cli.main(["prepare", str(path), "--workers", "2", "--shard-rows", "5"]) == 0
    out = capsys.readouterr().out
    assert "24 rows -> 24 examples" in out and "5 shards written" in out and "tokens/s" in out
    assert cli.main(["prepare", str(path)]) == 0 and "already prepared" in capsys.readouterr().out
    _, summary = tunesmith.train(str(path))
    assert summary["status"] == "completed" and summary["train_rows"] + summary["validation_rows"] == 24
    assert cli.main(["prepare", str(path), "data.cache=null"]) == 2


def test_a_bad_row_stops_prepare_naming_it_and_leaves_no_manifest(tmp_path, tok):
    rows = alpaca_rows(9) + [{"instruction": "", "output": "x"}]
    cfg = data_cfg(tmp_path, train=str(write_jsonl(tmp_path / "bad.jsonl", rows)))
    with pytest.raises(DataError, match=r"bad.jsonl:10"):
        prepare(cfg, tok, objective=SFT, max_seq_len=64, shard_rows=4, workers=2, progress=False)
    assert not list(Path(cfg.cache).glob("*/manifest.json"))
    skipped = cfg.model_copy(update={"on_error": "skip"})
    done = prepare(skipped, tok, objective=SFT, max_seq_len=64, shard_rows=4, progress=False)
    train, _, report = build_datasets(skipped, tok, max_seq_len=64, objective=SFT, seed=0)
    assert done.examples == 9 and report.skipped == 1 and "bad.jsonl:10" in report.skipped_reasons[0]
