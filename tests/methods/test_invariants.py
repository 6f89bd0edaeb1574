"""The invariant matrix of DESIGN.md, run for every registered method.

Each method declares what applies to it through class attributes of ``Method``:
``identity_at_init`` (output equals the base at init), ``mergeable`` (merge() folds it into plain
weights), and ``invariant_cases`` (the configs and model kinds to test). Per-method files
test the closed-form trainable count and the paper's formula or peft parity.
"""
from __future__ import annotations

import copy

import pytest
import torch

import tunesmith
from tunesmith.methods import registry
from tunesmith.methods.inject import disable_adapters, tuned_layers

from helpers import ids, rel_err, tiny

CASES = [(name, i) for name, cls in registry.all_methods().items() for i in range(len(cls.invariant_cases))]


def _setup(name: str, i: int):
    cls = registry.get(name)
    case = cls.invariant_cases[i]
    model = tiny(case.get("arch", "llama"), task=case.get("task", "causal_lm"), seed=1)
    base = copy.deepcopy(model)
    tunesmith.apply(model, name, **case.get("options", {}))
    return cls, case, base, model


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("name,i", CASES)
def test_identity_at_init(name, i):
    cls, case, base, model = _setup(name, i)
    if not cls.identity_at_init:
        pytest.skip(f"{name} changes the output at init by design")
    x = ids()
    assert rel_err(_logits(model, x), _logits(base, x)) < 1e-6


@pytest.mark.parametrize("name,i", CASES)
def test_disabled_equals_base(name, i):
    cls, case, base, model = _setup(name, i)
    if not list(tuned_layers(model)):
        pytest.skip(f"{name} wraps no layers (it marks parameters)")
    _perturb(model, only_new=dict(base.named_parameters()))  # trained base tensors (biases) stay
    x = ids()
    with disable_adapters(model):
        out = _logits(model, x)
    assert rel_err(out, _logits(base, x)) < 1e-6
    assert rel_err(_logits(model, x), _logits(base, x)) > 1e-4  # and enabled differs


def _perturb(model, only_new: dict | None = None):
    """Move trainable tensors away from their init so that invariants are not vacuous
    (with ``only_new``: just the tensors the method added, not trained base tensors)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if only_new is not None and n.replace(".base_layer.", ".") in only_new:
                continue
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name,i", CASES)
def test_merged_equals_unmerged(name, i):
    cls, case, base, model = _setup(name, i)
    if not cls.mergeable:
        pytest.skip(f"{name} does not merge into the weights")
    _perturb(model)
    x = ids()
    before = _logits(model, x)
    merged = registry.attached(model).merge(model)
    assert not list(tuned_layers(merged))
    assert rel_err(_logits(merged, x), before) < 1e-5


@pytest.mark.parametrize("name,i", CASES)
def test_only_intended_params_get_gradients(name, i):
    cls, case, base, model = _setup(name, i)
    _perturb(model)
    model.train()
    x = ids()
    out = model(input_ids=x).logits
    out.float().pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the method left nothing trainable"
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert p.grad is None, f"frozen parameter {n} received a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize("name,i", CASES)
def test_save_load_round_trip(name, i, tmp_path):
    cls, case, base, model = _setup(name, i)
    _perturb(model)
    method = registry.attached(model)
    path = method.save(model, tmp_path, "unused")
    fresh = copy.deepcopy(base)
    loaded = cls.load_artifact(fresh, path) if cls.artifact != "model" else _load_model_dir(path, case)
    x = ids()
    assert rel_err(_logits(loaded, x), _logits(model, x)) < 1e-6


def _load_model_dir(path, case):
    import transformers as tf
    auto = tf.AutoModelForSequenceClassification if case.get("task") == "classification" else tf.AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32)
