"""Prompt tuning: peft parity (logits, 30-step curve, TEXT init), closed-form count, the one loop."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model

import tunesmith
from additive_helpers import (copy, copy_encoder, curve, lm_batches, logits, max_rel_diff, perturb, small,
                              train_and_reload)
from helpers import rel_err, tiny
from tunesmith.methods import registry
from tunesmith.methods.prompt import prompt_trainable_count, tokenizer_for

N = 5


def _pair(arch="llama", task="causal_lm", **opts):
    base = small(arch, task)
    ours = tunesmith.apply(copy.deepcopy(base), "prompt", num_virtual_tokens=N, **opts)
    theirs = get_peft_model(copy.deepcopy(base), PromptTuningConfig(
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS", num_virtual_tokens=N))
    copy_encoder(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("arch,task", [("llama", "causal_lm"), ("bert", "classification")])
def test_logits_match_peft(arch, task):
    ours, theirs = _pair(arch, task)
    b = lm_batches(1)[0]
    skip = N if task == "causal_lm" else 0  # peft returns the virtual positions' logits too
    assert rel_err(logits(ours, b), logits(theirs, b)[:, skip:]) <= 1e-5


def test_loss_curve_matches_peft():
    ours, theirs = _pair()
    batches = lm_batches()
    a, b = curve(ours, batches), curve(theirs, batches, skip=N)
    assert sum(a[-5:]) / 5 < a[0]  # it learns
    assert max_rel_diff(a, b) <= 0.01


def test_text_init_matches_peft():
    base = tiny("llama", seed=1)  # the tokenizer's full vocabulary
    ours = tunesmith.apply(copy.deepcopy(base), "prompt", num_virtual_tokens=12, init_text="Classify the review")
    tok_dir = tokenizer_for(base).name_or_path
    theirs = get_peft_model(copy.deepcopy(base), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=12, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Classify the review", tokenizer_name_or_path=tok_dir))
    assert torch.equal(ours.prompt_encoder.embedding.weight, theirs.prompt_encoder["default"].embedding.weight)


def test_random_init_samples_vocabulary_embeddings():
    base = small()
    ours = tunesmith.apply(copy.deepcopy(base), "prompt", num_virtual_tokens=6)
    rows = ours.prompt_encoder.embedding.weight
    emb = base.get_input_embeddings().weight
    assert all(((emb - r).abs().sum(-1) == 0).any() for r in rows)


def test_trainable_count_closed_form():
    m = tunesmith.apply(small(), "prompt", num_virtual_tokens=N)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == prompt_trainable_count(m, N)


def test_peft_loads_our_adapter(tmp_path):
    base = small()
    ours = tunesmith.apply(copy.deepcopy(base), "prompt", num_virtual_tokens=N)
    perturb(ours)
    path = registry.attached(ours).save(ours, tmp_path, "unused")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    b = lm_batches(1)[0]
    assert rel_err(logits(ours, b), logits(theirs, b)[:, N:]) <= 1e-5


@pytest.mark.parametrize("objective", ["sft", "pt", "cls"])
def test_trains_in_the_loop_and_round_trips(tmp_path, objective):
    res = train_and_reload(tmp_path, {"name": "prompt", "num_virtual_tokens": 4}, objective)
    assert res["change"] > 1e-4 and res["reload_err"] < 1e-6
