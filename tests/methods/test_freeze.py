"""Freezing policies: layers (index, range, first/last k), parameter types (norms, biases, attention,
mlp) everywhere or inside the chosen layers, embeddings, regex include/exclude; training moves only
the selection and the dense delta reproduces it."""
from __future__ import annotations

import copy

import pytest
import torch

import tunesmith
from tunesmith.api import train
from tunesmith.errors import ConfigError
from tunesmith.methods import registry

from helpers import run_config
from selective_helpers import cls_batches, logits, small, train_steps


def _trainable(name: str, arch: str = "llama", **options) -> set[str]:
    model = small(arch, "classification" if arch == "bert" else "causal_lm")
    tunesmith.apply(model, name, **options)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_defaults_train_the_last_two_layers():
    names = _trainable("freeze")
    assert names and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in names)
    assert len(names) == 2 * 9


def test_norms_everywhere():
    assert _trainable("freeze", layers="none", types=["norms"]) == {
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight"}


def test_attention_of_the_last_layer_only():
    assert _trainable("freeze", layers="last 1", layer_types=["attention"]) == {
        f"model.layers.1.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")}


def test_bert_biases_and_mlp_plus_head():
    names = _trainable("freeze", "bert", layers="none", types=["biases", "mlp"])
    assert "bert.encoder.layer.1.output.dense.weight" in names and "bert.encoder.layer.0.intermediate.dense.weight" in names
    assert "bert.encoder.layer.0.attention.output.dense.weight" not in names      # attention, not mlp
    assert "bert.encoder.layer.0.attention.output.dense.bias" in names           # a bias
    assert {"classifier.weight", "classifier.bias"} <= names                      # head for classification
    assert not any(n.endswith("weight") and "LayerNorm" in n for n in names)


def test_first_k_embeddings_and_regexes():
    names = _trainable("freeze", layers="first 1", embeddings=True, exclude=["mlp"], include=[r"^model\.norm\."])
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any(".mlp." in n or n.startswith("model.layers.1.") for n in names)


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"method.layers: 'last 9'.*valid"):
        _trainable("freeze", layers="last 9")
    with pytest.raises(ConfigError, match="types"):
        _trainable("freeze", types=["heads"])
    with pytest.raises(ConfigError, match="invalid regex"):
        _trainable("freeze", include=["("])
    with pytest.raises(ConfigError, match="leaves no parameter"):
        _trainable("freeze", layers="none")


def test_only_the_selection_moves_and_the_delta_reproduces_it(tmp_path):
    base, batches = small(), cls_batches()
    model = copy.deepcopy(base)
    tunesmith.apply(model, "freeze", layers="last 1", layer_types=["attention", "norms"], head=True)
    selected = {n for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, batches, weight_decay=0.1)
    trained = dict(model.named_parameters())
    for n, p in base.named_parameters():
        changed = trained[n] != p
        assert (changed.float().mean() > 0.95) if n in selected else not changed.any(), n
    path = registry.attached(model).save(model, tmp_path, "random:bert")
    loaded = registry.get("freeze").load_artifact(copy.deepcopy(base), path)
    for n, p in loaded.named_parameters():
        assert torch.equal(p, trained[n]), n


def test_end_to_end_types(cls_file, tmp_path):
    run_dir, s = train(run_config(cls_file, tmp_path, {"name": "freeze", "layers": "none", "types": ["norms", "biases"]},
                                  model="random:bert", max_steps=2))
    loaded, _ = tunesmith.load(run_dir)
    merged, _ = tunesmith.load(tunesmith.merge(run_dir, tmp_path / "merged"))
    b = {"input_ids": torch.randint(5, 1000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    assert torch.equal(logits(merged, b), logits(loaded, b))
    assert s["trainable_pct"] < 1.0 and s["artifact_bytes"] < 40_000
