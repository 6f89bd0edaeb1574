"""More than one process on the CPU (gloo): 2 processes take the steps 1 process takes with the same global
batch (full and LoRA under FSDP2, prompt tuning under ddp), a killed 2-process run resumes to the
uninterrupted one (on 2 processes, and on 1), and the saved adapter or model equals the one-process run's.

All the 2-process runs share one pair of processes forked from this one (tests/dist_worker.py, which also
runs under torchrun); the 1-process runs are in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
import dist_worker
from helpers import alpaca_rows, run_config, write_jsonl
from tunesmith import cli
from tunesmith.errors import ConfigError
from tunesmith.train import distributed, launch

ROOT = Path(__file__).resolve().parents[1]
# name: (method, train.parallel, per-process batch and accumulation of the 2-process run); one process: batch 4
CASES = {"full": ({"name": "full"}, "fsdp", 1, 2), "lora": ({"name": "lora", "r": 4}, "fsdp", 2, 1),
         "prompt": ({"name": "prompt", "num_virtual_tokens": 4}, "ddp", 1, 2),
         "adalora": ({"name": "adalora", "init_r": 4, "target_r": 2}, "ddp", 2, 1)}   # a regularization term and rank hooks


def _config(data, out: Path, method: dict, parallel: str, batch_size: int, grad_accum: int = 1) -> dict:
    cfg = run_config(data, out, method, batch_size=batch_size, grad_accum=grad_accum, max_steps=4, save_every=2,
                     seed=0, parallel=parallel, lr=1e-2 if method["name"] != "full" else 1e-3)
    cfg["output"]["dir"] = str(out / "run")
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    data = write_jsonl(d / "train.jsonl", alpaca_rows(34))   # 32 train rows (2 validation)
    spec = {name: {"config": _config(data, d / f"two-{name}", m, par, b, k)} for name, (m, par, b, k) in CASES.items()}
    spec["killed"] = {"config": _config(data, d / "two-killed", CASES["lora"][0], "fsdp", 2), "kill_at": 3,
                      "copy_to": str(d / "killed-copy")}
    spec["fused"] = {"fused": ["lora", "dora"], "out": str(d / "fused.json")}
    (d / "spec.json").write_text(json.dumps(spec))
    one = {name: tunesmith.train(_config(data, d / f"one-{name}", m, "auto", 4)).run_dir
           for name, (m, *_) in CASES.items()}
    dist_worker.spawn(str(d / "spec.json"))
    two = {name: Path(c["config"]["output"]["dir"]) for name, c in spec.items() if "config" in c}
    return d, one, two


def _train_records(run_dir: Path, splits) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["split"] in splits]


def _assert_same_losses(a: Path, b: Path, rtol: float = 1e-5, splits=("train", "eval", "train_probe")) -> None:
    ra, rb = _train_records(a, splits), _train_records(b, splits)
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=rtol), (x, y)
        if x["split"] == "train":
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), (x, y)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = list(run_dir.glob("adapter/*.safetensors")) + list(run_dir.glob("model/*.safetensors"))
    assert files, f"no artifact under {run_dir}"
    return {k: v for f in files for k, v in load_file(f).items()}


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_take_the_one_process_steps(runs, name):
    """Same global batch (2 processes × 2, or × 1 × 2 accumulated micro-batches, against 1 × 4): the same
    losses, gradient norms and saved weights."""
    _, one, two = runs
    # the train probe is the first micro-batches of train: the same examples only for the same micro-batch
    same_micro = CASES[name][2] * 2 == 4
    _assert_same_losses(two[name], one[name], splits=("train", "eval") + (("train_probe",) if same_micro else ()))
    _assert_same_weights(two[name], one[name])
    summary = json.loads((two[name] / "summary.json").read_text())
    assert summary["status"] == "completed"
    par = summary["parallel"]
    assert (par["mode"], par["processes"], len(par["peak_memory_gib"])) == (CASES[name][1], 2, 2)
    assert par["train_tokens"] == json.loads((one[name] / "summary.json").read_text())["train_tokens"]
    assert sorted(p.name for p in (two[name] / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (two[name] / "checkpoints" / "step-4" / "dcp" / ".metadata").is_file()


def test_fused_lora_base_node_survives_reshard(runs):
    """The fused LoRA and DoRA ops keep W0 on ctx (no saved tensor): FSDP2 frees its storage after the
    block's forward and gathers it again before the block's backward, when the node reads it."""
    d, _, _ = runs
    for method, found in json.loads((d / "fused.json").read_text()).items():
        assert len(found["after_forward"]) == len(found["in_backward"]) == 14, method   # 7 projections × 2 blocks
        assert set(found["after_forward"]) == {0}, method
        assert min(found["in_backward"]) > 0, method


def test_artifact_is_the_single_process_format(runs):
    """The peft adapter and the transformers directory that one process writes, file for file."""
    _, one, two = runs
    for name, sub in (("lora", "adapter"), ("full", "model"), ("prompt", "adapter"), ("adalora", "adapter")):
        assert sorted(p.name for p in (two[name] / sub).iterdir()) == sorted(p.name for p in (one[name] / sub).iterdir())
    assert json.loads((two["lora"] / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((one["lora"] / "adapter" / "adapter_config.json").read_text())


def test_killed_run_resumes_to_the_uninterrupted_one(runs):
    """Killed before step 4 (after the step-2 checkpoint), resumed on the same 2 processes."""
    _, _, two = runs
    _assert_same_losses(two["killed"], two["lora"], rtol=1e-6)
    _assert_same_weights(two["killed"], two["lora"], atol=1e-6)


def test_sharded_checkpoint_resumes_on_one_process(runs):
    """The 2-process checkpoint of the killed run, resumed by one process with the same global batch."""
    d, _, two = runs
    copy = d / "killed-copy"
    with pytest.raises(ConfigError, match="global micro-batch of 4"):
        tunesmith.train(None, resume=copy)                         # batch 2 on one process: refused
    tunesmith.train(None, resume=copy, **{"train.batch_size": "4"})
    _assert_same_losses(copy, two["lora"])
    _assert_same_weights(copy, two["lora"])


def test_a_damaged_sharded_checkpoint_falls_back_to_the_one_before(runs, tmp_path, capsys):
    """The newest sharded checkpoint's shards cut short: one warning, and the resume starts from the one before."""
    _, _, two = runs
    run = tmp_path / "run"
    shutil.copytree(two["lora"], run)
    shutil.rmtree(run / "adapter")
    shards = list((run / "checkpoints" / "step-4" / "dcp").glob("*.distcp"))
    assert shards and (run / "checkpoints" / "step-2" / "dcp").is_dir()
    for f in shards:
        f.write_bytes(f.read_bytes()[:16])
    capsys.readouterr()
    _, metrics = tunesmith.train(None, resume=run, **{"train.batch_size": "4"})
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: checkpoint step-4 unreadable ({run}/checkpoints/"
                                                         "step-4/dcp: cannot be read by torch.distributed.checkpoint")
    assert warnings[0].endswith("resuming from step-2, the newest readable checkpoint")
    assert metrics["status"] == "completed" and metrics["steps"] == 4
    _assert_same_weights(run, two["lora"])


def test_sharded_batches_split_the_one_process_batches(tmp_path):
    ds = list(range(11))
    whole = distributed.Batches(ds, 4, 3, 0, torch.device("cpu"))
    shards = [distributed.ShardedBatches(ds, 2, 3, 0, torch.device("cpu"), rank=r, world=2) for r in range(2)]
    assert shards[0].per_epoch() == shards[1].per_epoch() == 3
    for k in range(6):   # two epochs
        epoch, i = whole.locate(k)
        parts = [s.order(epoch)[i] for s in shards]
        assert parts[0] + parts[1] == whole.order(epoch)[i]
        assert min(len(p) for p in parts) >= 1


def test_packed_rows_go_round_robin():
    """padding_free: rank r takes packed rows r, r + 2, ... of the one-process order; every rank as many."""
    ds = [{"input_ids": [1] * n} for n in (5, 3, 7, 2, 6, 4, 8, 1, 3)]
    whole = distributed.Batches(ds, 1, 0, 0, torch.device("cpu"), packed_tokens=8)
    shards = [distributed.ShardedBatches(ds, 1, 0, 0, torch.device("cpu"), packed_tokens=8, rank=r, world=2)
              for r in range(2)]
    rows = whole.order(0)
    n = len(rows) // 2
    assert [s.order(0) for s in shards] == [rows[0:2 * n:2], rows[1:2 * n:2]]
    assert shards[0].per_epoch() == shards[1].per_epoch() == n


def test_refusals_before_the_model_loads(monkeypatch):
    from tunesmith.config import TrainConfig
    from tunesmith.methods import registry
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.parallel: fsdp .* 'adalora' .* train.parallel: ddp"):
        distributed.check(TrainConfig(parallel="fsdp"), registry.get("adalora"), None)
    with pytest.raises(ConfigError, match="train.chunked_ce"):
        distributed.check(TrainConfig(parallel="fsdp", chunked_ce=True), registry.get("lora"), None)
    with pytest.raises(ConfigError, match="train.optimizer"):
        distributed.check(TrainConfig(parallel="fsdp", optimizer="paged_adamw_8bit"), registry.get("lora"), None)
    distributed.check(TrainConfig(parallel="ddp"), registry.get("adalora"), None)
    distributed.check(TrainConfig(parallel="auto"), registry.get("adalora"), None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check(TrainConfig(parallel="fsdp"), registry.get("adalora"), None)   # one process: ignored


def test_nproc_launches_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    data = write_jsonl(tmp_path / "t.jsonl", alpaca_rows(4))
    cfg = tmp_path / "c.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump(run_config(data, tmp_path, {"name": "lora"})))
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["train", str(cfg), "train.lr=1e-4", "--nproc", "2"]) == 0
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "-m", "tunesmith", "train", str(cfg), "train.lr=1e-4"]]
    assert cli.main(["train", str(cfg), "train.nope=1", "--nproc", "2"]) == 2    # refused before launching
    assert len(calls) == 1
    assert (ROOT / "src" / "tunesmith" / "__main__.py").is_file()


def test_auto_picks_ddp_where_the_model_fits(monkeypatch):
    """auto: ddp on the CPU and for methods with whole-tensor hooks; on a GPU, fsdp once the unsharded
    weights, gradients and AdamW states pass half the memory."""
    from helpers import tiny
    from tunesmith.config import TrainConfig
    from tunesmith.methods import registry
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context(rank=0, world=2, joined=True))
    model = tiny()
    full = registry.get("full")(registry.build_config({"name": "full"}))
    full.apply(model)
    state = sum(p.numel() * (2 * p.element_size() + 8) for p in model.parameters())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert distributed.mode(TrainConfig(), full, model, cpu) == "ddp"
    assert distributed.mode(TrainConfig(memory_limit=str(2 * state)), full, model, cuda) == "ddp"
    assert distributed.mode(TrainConfig(memory_limit=str(2 * state - 1)), full, model, cuda) == "fsdp"
    adalora = registry.get("adalora")(registry.build_config({"name": "adalora"}))
    assert distributed.mode(TrainConfig(memory_limit="1KiB"), adalora, model, cuda) == "ddp"
    assert distributed.mode(TrainConfig(parallel="fsdp"), full, model, cpu) == "fsdp"
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context())
    assert distributed.mode(TrainConfig(parallel="fsdp"), full, model, cpu) == "none"
