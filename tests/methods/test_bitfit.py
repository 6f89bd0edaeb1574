"""BitFit (Ben Zaken et al. 2022): only biases (and a classifier head) train; zero biases are added
to bias-free models and survive save, load and merge."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import tunesmith
from tunesmith.api import train
from tunesmith.errors import ConfigError
from tunesmith.methods import registry

from helpers import ids, rel_err, run_config
from selective_helpers import cls_batches, logits, small, train_steps

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_llama_gets_zero_biases_on_every_projection():
    model = small("llama", "causal_lm")
    tunesmith.apply(model, "bitfit")
    names = _trainable(model)
    assert names == {f"model.layers.{i}.{blk}.{m}.bias" for i in range(2)
                     for blk, ms in (("self_attn", PROJ[:4]), ("mlp", PROJ[4:])) for m in ms}
    # closed form: Σ_layers Σ_projections d_out = 2 · (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 512
    assert all(torch.equal(p, torch.zeros_like(p)) for p in model.parameters() if p.requires_grad)


def test_bert_trains_its_own_biases_and_the_head():
    base = small()
    model = copy.deepcopy(base)
    tunesmith.apply(model, "bitfit")
    assert len(list(model.parameters())) == len(list(base.parameters()))   # nothing added
    expected = {n for n, _ in base.named_parameters() if n.endswith(".bias") or n.startswith("classifier.")}
    assert _trainable(model) == expected and "bert.encoder.layer.0.attention.output.LayerNorm.bias" in expected


def test_qwen2_auto_keeps_its_qkv_biases_and_true_adds_the_rest():
    auto, every = small("qwen2", "causal_lm"), small("qwen2", "causal_lm")
    tunesmith.apply(auto, "bitfit")
    assert {n.split(".")[-2] for n in _trainable(auto)} == {"q_proj", "k_proj", "v_proj"}
    tunesmith.apply(every, "bitfit", add_missing_biases=True)
    assert {n.split(".")[-2] for n in _trainable(every)} == set(PROJ)
    with pytest.raises(ConfigError, match="no config switch"):
        registry.attached(every).merge(every)                              # Qwen2 has no o_proj/mlp bias switch


def test_no_biases_and_adding_disabled_is_an_error():
    with pytest.raises(ConfigError, match="add_missing_biases"):
        tunesmith.apply(small("llama", "causal_lm"), "bitfit", add_missing_biases=False)
    with pytest.raises(ConfigError, match="add_missing_biases.*matches no"):
        tunesmith.apply(small("llama", "causal_lm"), "bitfit", add_missing_biases=["nope"])


def test_merge_turns_on_the_switch_for_a_partial_list():
    model = small("llama", "causal_lm")
    tunesmith.apply(model, "bitfit", add_missing_biases=["q_proj"])
    assert {n.split(".")[-2] for n in _trainable(model)} == {"q_proj"}
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.add_(0.5)
    x = ids(vocab=300)
    before = model(input_ids=x).logits
    merged = registry.attached(model).merge(model)
    assert merged.config.attention_bias is True and merged.config.mlp_bias is False
    assert torch.equal(merged.model.layers[1].self_attn.o_proj.bias, torch.zeros(64))
    assert rel_err(merged(input_ids=x).logits, before) < 1e-6


def test_only_biases_move_in_training():
    base, batches = small(), cls_batches()
    model = copy.deepcopy(base)
    tunesmith.apply(model, "bitfit")
    train_steps(model, batches, weight_decay=0.1)
    trained = dict(model.named_parameters())
    for n, p in base.named_parameters():
        changed = trained[n] != p
        if n.endswith(".bias") or n.startswith("classifier."):
            assert changed.float().mean() > 0.95, n
        else:
            assert not changed.any(), n


def test_end_to_end_llama_train_load_merge(alpaca_file, tmp_path):
    run_dir, s = train(run_config(alpaca_file, tmp_path, {"name": "bitfit"}, max_steps=2))
    assert s["trainable_params"] == 2 * 512 and s["artifact_bytes"] < 20_000
    assert s["optimizer_state_bytes"] <= 8 * 2 * 512 + 14 * 8
    loaded, _ = tunesmith.load(run_dir)
    assert loaded.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    out = tunesmith.merge(run_dir, tmp_path / "merged")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    merged, _ = tunesmith.load(out)
    b = {"input_ids": ids(2, 9), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    assert torch.equal(logits(merged, b), logits(loaded, b))
