"""Adapters name a base that loads on another machine: tunesmith's name in tunesmith.json (an embedded
name, a GGUF file, a model directory, a hub id), the original hub id for peft users, never the
local GGUF-conversion cache."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import tunesmith
from helpers import alpaca_rows, ids, run_config, write_jsonl
from tunesmith.methods import peft_format
from tunesmith.models.loader import ModelConfig, base_reference, cache_root, peft_base_name, stored_base


def test_base_reference_is_the_name_tunesmith_resolves(tmp_path, monkeypatch):
    assert base_reference(ModelConfig(name_or_path="smollm2-135m")) == "smollm2-135m"
    assert base_reference(ModelConfig(name_or_path="random:llama")) == "random:llama"
    assert base_reference(ModelConfig(name_or_path="Org/model")) == "Org/model"
    (tmp_path / "model").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert base_reference(ModelConfig(name_or_path="model")) == str(tmp_path / "model")   # absolute
    assert base_reference(ModelConfig(name_or_path="m.gguf")) == str(tmp_path / "m.gguf")


def test_peft_users_read_the_hub_id_and_tunesmith_its_own_name(tmp_path):
    peft_format.write_configs(tmp_path, {"peft_type": "LORA", "base_model_name_or_path": "smollm2-135m"},
                              {"method": {"name": "lora"}, "base": "smollm2-135m"})
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_format.read_meta(tmp_path)["base"] == "smollm2-135m"
    assert peft_base_name("random:llama") == "random:llama" and peft_base_name("/a/dir") == "/a/dir"


def test_a_cleared_conversion_cache_path_maps_back_to_the_embedded_name(tmp_path):
    stale = cache_root() / "gguf" / "SmolLM2-135M-Instruct.Q4_1-0123456789ab"
    assert not stale.exists() and stored_base(str(stale)) == "smollm2-135m"
    other = tmp_path / "gguf" / "SomethingElse-0123456789ab"
    assert stored_base(str(other)) == str(other)


def test_a_tiny_runs_adapter_names_its_base_portably(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows())
    run_dir, _ = tunesmith.train(run_config(data, tmp_path, {"name": "lora", "r": 2}, max_steps=1))
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "random:llama"
    assert json.loads((run_dir / "adapter" / "tunesmith.json").read_text())["base"] == "random:llama"


@pytest.mark.slow
@pytest.mark.integration
def test_an_embedded_smollm2_adapter_loads_after_the_cache_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8))
    run_dir, _ = tunesmith.train(run_config(data, tmp_path, {"name": "lora", "r": 2}, model="smollm2-135m",
                                            max_steps=1, batch_size=2, max_seq_len=32, lr=1e-2))
    adapter = run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((adapter / "tunesmith.json").read_text())["base"] == "smollm2-135m"
    assert "cache" not in (adapter / "adapter_config.json").read_text()
    before, _ = tunesmith.load(adapter, device="cpu")
    x = ids(vocab=1000)
    with torch.no_grad():
        want = before(input_ids=x).logits
    shutil.rmtree(tmp_path / "cache")
    after, _ = tunesmith.load(adapter, device="cpu")   # converts the GGUF file again
    with torch.no_grad():
        assert torch.equal(after(input_ids=x).logits, want)
