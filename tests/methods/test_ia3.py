"""(IA)³: peft parity (logits on Llama/Qwen2/BERT, 30-step curve), adapters both ways, merge into
the weights, closed-form count, validation, the one loop."""
from __future__ import annotations

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model

import tunesmith
from additive_helpers import copy, curve, lm_batches, logits, max_rel_diff, small, train_and_reload
from helpers import rel_err
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.methods.ia3 import ia3_trainable_count


def _pair(arch="llama", task="causal_lm", **opts):
    base = small(arch, task)
    ours = tunesmith.apply(copy.deepcopy(base), "ia3", **opts)
    targets, ff = registry.attached(ours).specs(ours)
    theirs = get_peft_model(copy.deepcopy(base), IA3Config(
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS", target_modules=targets, feedforward_modules=ff))
    g = torch.Generator().manual_seed(0)
    theirs_l = {n.replace("base_model.model.", "").replace(".default", ""): p
                for n, p in theirs.named_parameters() if "ia3_l" in n}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "ia3_l" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
                theirs_l[n].copy_(p)
    return base, ours, theirs


@pytest.mark.parametrize("arch,task", [("llama", "causal_lm"), ("qwen2", "causal_lm"), ("bert", "classification")])
def test_logits_match_peft(arch, task):
    _, ours, theirs = _pair(arch, task)
    b = lm_batches(1)[0]
    assert rel_err(logits(ours, b), logits(theirs, b)) <= 1e-5


def test_loss_curve_matches_peft():
    _, ours, theirs = _pair()
    batches = lm_batches()
    a, b = curve(ours, batches, lr=3e-2), curve(theirs, batches, lr=3e-2)
    assert sum(a[-5:]) / 5 < a[0]
    assert max_rel_diff(a, b) <= 0.01


def test_adapters_load_both_ways(tmp_path):
    base, ours, theirs = _pair("qwen2")
    b = lm_batches(1)[0]
    path = registry.attached(ours).save(ours, tmp_path / "ours", "unused")
    assert rel_err(logits(PeftModel.from_pretrained(copy.deepcopy(base), str(path)), b), logits(ours, b)) <= 1e-5
    theirs.save_pretrained(tmp_path / "peft")
    loaded = registry.get("ia3").load_artifact(copy.deepcopy(base), tmp_path / "peft")
    assert rel_err(logits(loaded, b), logits(theirs, b)) <= 1e-5


def test_merge_scales_rows_and_columns():
    _, ours, _ = _pair()
    b = lm_batches(1)[0]
    before = logits(ours, b)
    k = ours.model.layers[0].self_attn.k_proj
    down = ours.model.layers[0].mlp.down_proj
    expect_k = k.base_layer.weight * k.ia3_l               # diag(l_k) W
    expect_down = down.base_layer.weight * down.ia3_l      # W diag(l_ff)
    merged = registry.attached(ours).merge(ours)
    assert torch.allclose(merged.model.layers[0].self_attn.k_proj.weight, expect_k)
    assert torch.allclose(merged.model.layers[0].mlp.down_proj.weight, expect_down)
    assert rel_err(logits(merged, b), before) <= 1e-5


def test_trainable_count_closed_form():
    m = tunesmith.apply(small("bert", "classification"), "ia3")
    method = registry.attached(m)
    heads = sum(p.numel() for p in m.classifier.parameters())
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == \
        ia3_trainable_count(m, method.targets, method.ff_targets) + heads


def test_feedforward_must_be_among_targets():
    with pytest.raises(ConfigError, match="feedforward_modules"):
        tunesmith.apply(small(), "ia3", target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])


@pytest.mark.parametrize("objective", ["sft", "pt", "cls"])
def test_trains_in_the_loop_and_round_trips(tmp_path, objective):
    res = train_and_reload(tmp_path, {"name": "ia3"}, objective)
    assert res["change"] > 1e-4 and res["reload_err"] < 1e-6
