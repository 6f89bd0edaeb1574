"""The speed paths as ``train.*`` fields: padding-free packing, chunked cross-entropy, compiled
layers, Liger. Each must compute what the plain path computes, and refuse what it cannot do."""
from __future__ import annotations

import json

import pytest
import torch

import tunesmith
from helpers import run_config
from tunesmith.config import ConfigError
from tunesmith.data.collate import IGNORE
from tunesmith.kernels import liger
from tunesmith.train.loop import Batches


def _records(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def _with_validation(cfg, path):
    cfg["data"]["validation"] = str(path)
    return cfg


def test_padding_free_step_equals_the_padded_step(alpaca_file, tmp_path):
    """One step over all 48 examples: packed into one row, or padded into one batch of 48. The
    loss is a mean over the same label tokens, so the logged loss, the update and the eval loss
    after it agree; the packed run counts only real tokens."""
    method = {"name": "lora", "r": 4}
    common = {"max_steps": 1, "lr": 1e-2, "max_seq_len": 64, "scheduler": "constant"}
    padded, mp = tunesmith.train(_with_validation(
        run_config(alpaca_file, tmp_path / "a", method, batch_size=48, **common), alpaca_file))
    packed, mk = tunesmith.train(_with_validation(
        run_config(alpaca_file, tmp_path / "b", method, batch_size=1, padding_free=True,
                   max_tokens_per_batch=100_000, **common), alpaca_file))
    (lp,), (lk,) = _records(padded, "train"), _records(packed, "train")
    assert abs(lk["loss"] - lp["loss"]) <= 1e-5 * abs(lp["loss"])
    assert abs(mk["eval_loss_after"] - mp["eval_loss_after"]) <= 1e-4 * abs(mp["eval_loss_after"])
    assert mk["eval_loss_after"] < mk["eval_loss_before"] - 0.05   # the step did something
    assert mk["train_tokens"] == mp["train_tokens"]                  # real tokens only, both ways
    assert mk["steps"] == 1


def test_packed_batches_cover_each_epoch_once_and_resume_by_position(tmp_path):
    lengths = [3, 9, 4, 12, 7, 5, 8, 2, 11, 6]
    ds = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    b = Batches(ds, batch_size=1, seed=3, pad_id=0, device=torch.device("cpu"), packed_tokens=16)
    seen, micro = [], 0
    for epoch in range(3):
        rows = []
        for _ in range(len(b.order(epoch))):
            batch = b.get(micro)
            micro += 1
            n = batch["input_ids"].shape[1]
            assert batch["input_ids"].shape[0] == 1 and (n <= 16 or len(batch["cu_seq_lens_q"]) == 2)
            assert "attention_mask" not in batch
            starts = batch["cu_seq_lens_q"][:-1].tolist()
            assert all(batch["labels"][0, s] == IGNORE for s in starts)   # no cross-document target
            rows.append(sorted(torch.diff(batch["cu_seq_lens_q"]).tolist()))
        assert sorted(x for r in rows for x in r) == sorted(lengths)   # every example once an epoch
        seen.append(rows)
    assert seen[0] != seen[1]                                           # reshuffled each epoch
    fresh = Batches(ds, batch_size=1, seed=3, pad_id=0, device=torch.device("cpu"), packed_tokens=16)
    last = micro - 1
    assert torch.equal(fresh.get(last)["input_ids"], b.get(last)["input_ids"])  # resume lands on the same row


def test_chunked_cross_entropy_gives_the_reference_losses(alpaca_file, tmp_path):
    method = {"name": "lora", "r": 4}
    ref, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "a", method, max_steps=3, chunked_ce=False))
    chunked, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "b", method, max_steps=3, chunked_ce=True))
    for x, y in zip(_records(chunked, "train"), _records(ref, "train"), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"])


def test_loss_chunks_of_a_few_rows_give_the_reference_losses(alpaca_file, tmp_path, monkeypatch):
    """train.loss_chunk_logits reaches the chunked loss: chunks of a few rows, the reference's losses."""
    from tunesmith.train.objectives import causal_lm
    seen = []
    real = causal_lm.linear_cross_entropy
    monkeypatch.setattr(causal_lm, "linear_cross_entropy", lambda *a, **k: (seen.append(k["chunk_elements"]), real(*a, **k))[1])
    method = {"name": "lora", "r": 4}
    ref, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "a", method, max_steps=2, chunked_ce=False))
    small, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "b", method, max_steps=2, chunked_ce=True,
                                          loss_chunk_logits=1000))   # a few rows of the small vocabulary a chunk
    assert seen and set(seen) == {1000}
    for x, y in zip(_records(small, "train"), _records(ref, "train"), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"])


@pytest.mark.slow
def test_compiled_layers_give_the_eager_losses(alpaca_file, tmp_path):
    method = {"name": "lora", "r": 4}
    eager, _ = tunesmith.train(run_config(alpaca_file, tmp_path / "a", method, max_steps=2))
    compiled, m = tunesmith.train(run_config(alpaca_file, tmp_path / "b", method, max_steps=2, compile=True))
    for x, y in zip(_records(compiled, "train"), _records(eager, "train"), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(y["loss"])
    reloaded, _ = tunesmith.load(compiled)   # the artifact has the plain (uncompiled) names
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())


@pytest.mark.parametrize("train, method, data, message", [
    ({"padding_free": True}, {"name": "lora"}, "cls", "train.padding_free: works with the objectives that train on packed rows"),
    ({"padding_free": True}, {"name": "prompt"}, "alpaca", "adds virtual tokens"),
    ({"max_tokens_per_batch": 512}, {"name": "lora"}, "alpaca", "only used with train.padding_free"),
    ({"chunked_ce": True}, {"name": "lora"}, "cls", "train.chunked_ce"),
    ({"liger": True}, {"name": "lora"}, "alpaca", "train.liger"),
    ({"loss_chunk_logits": 1 << 20}, {"name": "lora"}, "cls", "train.loss_chunk_logits: sizes the chunked loss of pt, sft"),
    ({"loss_chunk_logits": 1 << 20, "chunked_ce": False}, {"name": "lora"}, "alpaca", "chunked_ce: false turns off"),
])
def test_impossible_speed_settings_are_refused_before_loading(train, method, data, message, alpaca_file, cls_file,
                                                              tmp_path):
    if train.get("liger") and liger.available() and torch.cuda.is_available():
        pytest.skip("Liger and CUDA are both here")
    cfg = run_config(cls_file if data == "cls" else alpaca_file, tmp_path, method, **train)
    with pytest.raises(ConfigError, match=message):
        tunesmith.train(cfg)
    assert not (tmp_path / "run").exists()                             # nothing half-written


def test_speed_fields_are_validated_by_name(alpaca_file, tmp_path):
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora"}, chunked_ce="sometimes")
    with pytest.raises(ConfigError, match="train.chunked_ce"):
        tunesmith.train(cfg)
