"""DoRA: the paper's formula, peft parity (logits, gradients, 30-step curve), merge, peft interop."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F

import tunesmith
from tunesmith import api
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.methods.dora import Dora, DoraLinear, dora_trainable_count

from helpers import tiny, rel_err
from test_lora import (LLAMA_TARGETS, assert_curves_match, assert_parity, batch, copy_from_peft,  # noqa: F401
                       pair, perturb_peft, train_curve)


def _pair(**extra):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_TARGETS,
                          use_rslora=extra.get("use_rslora", False))
    base, model, pm = pair(cfg, "dora", r=4, alpha=8, **extra)
    perturb_peft(pm)
    copy_from_peft(model, pm)
    return base, model, pm


def test_forward_is_the_papers_formula():
    """W' = m · (W + s·BA) / ||W + s·BA||_c (eq. 5), bias added after."""
    base = torch.nn.Linear(16, 8)
    layer = DoraLinear(base, r=3, alpha=6, dropout=0.0)
    layer.reset("gaussian")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 2, 8))
    x = torch.randn(5, 16)
    v = base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    w = layer.lora_magnitude_vector.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
    assert rel_err(layer(x), F.linear(x, w, base.bias)) < 1e-6


def test_norm_is_constant_in_backward():
    """Only the numerator carries gradient to A and B (paper §4.3)."""
    base = torch.nn.Linear(16, 8)
    layer = DoraLinear(base, r=3, alpha=6, dropout=0.0)
    layer.reset("gaussian")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    a, b = layer.lora_A.weight, layer.lora_B.weight
    scale = (layer.lora_magnitude_vector / layer.weight_norm()).detach()
    # d/dB of sum(scale_o · s · (B A x)_o) with scale fixed
    expected = 2.0 * (scale.unsqueeze(1) * torch.ones(5, 8).T) @ (x @ a.T.detach())
    assert rel_err(b.grad, expected) < 1e-6


def test_logits_and_gradients_match_peft():
    _, model, pm = _pair()
    assert_parity(model, pm)


def test_rslora_dora_matches_peft():
    _, model, pm = _pair(use_rslora=True)
    assert_parity(model, pm)


def test_training_curve_matches_peft():
    _, model, pm = _pair()
    assert_curves_match(train_curve(model), train_curve(pm))


def test_merge_matches_peft_and_unmerge_restores():
    base, model, pm = _pair()
    name = "model.layers.0.mlp.up_proj"
    layer = model.get_submodule(name)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    merged_peft = pm.merge_and_unload()
    assert rel_err(layer.base_layer.weight, merged_peft.get_submodule(name).weight) < 1e-6
    layer.unmerge()
    assert rel_err(layer.base_layer.weight, w0) < 1e-6


def test_saves_peft_format_that_peft_loads(tmp_path):
    base, model, pm = _pair()
    path = registry.attached(model).save(model, tmp_path, "base")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    from safetensors.torch import load_file
    keys = load_file(path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    x = batch()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits) < 1e-5


def test_loads_peft_dora_adapter(tmp_path):
    base, _, pm = _pair()
    pm.save_pretrained(tmp_path / "a")
    peft_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert api._method_for_adapter(tmp_path / "a", peft_cfg) is Dora
    loaded = Dora.load_artifact(copy.deepcopy(base), tmp_path / "a").eval()
    x = batch()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=x).logits, pm.eval()(input_ids=x).logits) < 1e-5


def test_trainable_count_closed_form():
    model = tunesmith.apply(tiny(), "dora", r=4, target_modules=["q_proj", "down_proj"])
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == dora_trainable_count(model, 4, registry.attached(model).targets) == 2 * (4 * (128 + 192) + 64 + 64)


def test_pissa_init_is_refused():
    with pytest.raises(ConfigError, match="pissa"):
        tunesmith.apply(tiny(), "dora", init="pissa")


def test_dropout_recomputes_base_on_dropped_input():
    base = torch.nn.Linear(16, 8)
    layer = DoraLinear(base, r=3, alpha=6, dropout=0.5)
    layer.reset("gaussian")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 16)
    torch.manual_seed(0)
    out = layer.train()(x)
    torch.manual_seed(0)
    xd = layer.lora_dropout(x)
    scale = layer.lora_magnitude_vector / layer.weight_norm()
    expected = base(x) + (scale - 1) * F.linear(xd, base.weight) + scale * (xd @ (layer.lora_B.weight @ layer.lora_A.weight).T) * 2.0
    assert rel_err(out, expected) < 1e-6


def test_fused_path_equals_reference_path():
    """forward (kernels.dora, no dense W0 + s·BA) and forward_reference (peft's form) agree, grads too."""
    base = torch.nn.Linear(32, 24).requires_grad_(False)  # frozen, as apply() leaves it: the fusable case
    layer = DoraLinear(base, r=4, alpha=8, dropout=0.0)
    layer.reset("kaiming")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 24))
    from tunesmith.kernels.lora import fusable, frozen_weight
    assert fusable(frozen_weight(base), base.bias, torch.randn(2, 32))
    x = torch.randn(3, 5, 32, requires_grad=True)
    outs = []
    for fn in (layer.forward, layer.forward_reference):
        for p in (x, *layer.parameters()):
            p.grad = None
        y = fn(x)
        (y * torch.linspace(-1, 1, 24)).sum().backward()
        outs.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad])
    for got, want in zip(*outs):
        assert rel_err(got, want) < 1e-5
