"""Bottleneck adapters: the papers' computations written out on BERT encoder layers (Houlsby:
after attention and FFN; Pfeiffer: after FFN; parallel: beside the FFN), the Llama placement,
near-identity init, closed-form count, the one loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tunesmith
from additive_helpers import (VOCAB, bert_classify, bert_embed, bert_layer, perturb, small, train_and_reload)
from helpers import ids, rel_err
from tunesmith.methods.adapter import SerialAdapter, adapter_trainable_count


def _formula(wrapper, act):
    """A(h) = s · (f(h W_down + b_down) W_up + b_up), from the wrapper's tensors."""
    a, s = wrapper.adapter, wrapper.scaling
    return lambda h: s * F.linear(act(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)


@pytest.mark.parametrize("placement,act", [("houlsby", torch.relu), ("pfeiffer", torch.tanh),
                                           ("parallel", torch.relu)])
def test_matches_the_written_out_computation(placement, act):
    name = {torch.relu: "relu", torch.tanh: "tanh"}[act]
    m = tunesmith.apply(small("bert", "classification"), "adapter", placement=placement, nonlinearity=name,
                        reduction_factor=8)
    perturb(m, 0.2)
    m.eval()
    x = ids(2, 7, vocab=VOCAB)
    h = bert_embed(m, x)
    for layer in m.bert.encoder.layer:
        ff_out = layer.output.dense
        kw = {"ff_adapter": _formula(ff_out, act)} if placement != "parallel" else {"parallel": _formula(ff_out, act)}
        if placement == "houlsby":
            kw["attn_adapter"] = _formula(layer.attention.output.dense, act)
        h = bert_layer(layer, h, **kw)
    assert rel_err(m(input_ids=x).logits, bert_classify(m, h)) <= 1e-5


@pytest.mark.parametrize("placement,sites", [("houlsby", {"o_proj", "down_proj"}), ("pfeiffer", {"down_proj"}),
                                             ("parallel", {"down_proj", "up_proj"})])
def test_llama_placement(placement, sites):
    m = tunesmith.apply(small("llama"), "adapter", placement=placement)
    wrapped = {n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if hasattr(mod, "base_layer")
               and n.rsplit(".", 1)[-1] != "prompt_encoder"}
    assert wrapped == sites


def test_default_scaling_and_bottleneck():
    m = tunesmith.apply(small("llama"), "adapter")
    layer = next(mod for mod in m.modules() if isinstance(mod, SerialAdapter))
    assert layer.scaling == 1.0 and layer.adapter.down.out_features == 64 // 16
    p = tunesmith.apply(small("llama"), "adapter", placement="parallel")
    assert next(mod.scaling for mod in p.modules() if hasattr(mod, "tap")) == 4.0


@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)])
def test_trainable_count_closed_form(placement, per_layer):
    m = tunesmith.apply(small("llama"), "adapter", placement=placement, reduction_factor=8)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n == adapter_trainable_count(64, 8, per_layer * m.config.num_hidden_layers)


@pytest.mark.parametrize("objective", ["sft", "pt", "cls"])
def test_trains_in_the_loop_and_round_trips(tmp_path, objective):
    res = train_and_reload(tmp_path, {"name": "adapter", "reduction_factor": 8}, objective)
    assert res["change"] > 1e-4 and res["reload_err"] < 1e-6
    if objective == "cls":  # the task head trains alongside the adapters
        assert res["trainable_params"] > adapter_trainable_count(64, 8, 4)
