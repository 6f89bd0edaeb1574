"""P-tuning v1: peft parity for both encoders (logits, 30-step curve), folding, closed-form count, the loop."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, get_peft_model

import tunesmith
from additive_helpers import (copy, copy_encoder, curve, lm_batches, logits, max_rel_diff, perturb, small,
                              train_and_reload)
from helpers import rel_err
from tunesmith.methods import registry
from tunesmith.methods.ptuning import ptuning_trainable_count

N, K = 4, 16


def _pair(encoder="lstm", arch="llama", task="causal_lm"):
    base = small(arch, task)
    ours = tunesmith.apply(copy.deepcopy(base), "ptuning", num_virtual_tokens=N, encoder=encoder, encoder_hidden=K)
    theirs = get_peft_model(copy.deepcopy(base), PromptEncoderConfig(
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS", num_virtual_tokens=N,
        encoder_reparameterization_type=encoder.upper(), encoder_hidden_size=K))
    copy_encoder(ours, theirs)
    return base, ours, theirs


@pytest.mark.parametrize("encoder,arch,task", [("lstm", "llama", "causal_lm"), ("mlp", "qwen2", "causal_lm"),
                                               ("lstm", "bert", "classification")])
def test_logits_match_peft(encoder, arch, task):
    _, ours, theirs = _pair(encoder, arch, task)
    perturb(ours.prompt_encoder)  # peft keeps its own copy of the task head
    copy_encoder(ours, theirs)
    b = lm_batches(1)[0]
    skip = N if task == "causal_lm" else 0
    assert rel_err(logits(ours, b), logits(theirs, b)[:, skip:]) <= 1e-5


def test_loss_curve_matches_peft():
    _, ours, theirs = _pair("lstm")
    batches = lm_batches()
    a, b = curve(ours, batches, lr=3e-3), curve(theirs, batches, skip=N, lr=3e-3)
    assert sum(a[-5:]) / 5 < a[0]
    assert max_rel_diff(a, b) <= 0.01


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_encoder_folds_into_a_table_that_peft_loads(tmp_path, encoder):
    base, ours, _ = _pair(encoder)
    perturb(ours)
    path = registry.attached(ours).save(ours, tmp_path, "unused")
    loaded = registry.get("ptuning").load_artifact(copy.deepcopy(base), path)
    assert not any(isinstance(m, torch.nn.LSTM) for m in loaded.modules())  # the encoder is gone
    b = lm_batches(1)[0]
    assert rel_err(logits(loaded, b), logits(ours, b)) <= 1e-6
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    assert rel_err(logits(theirs, b)[:, N:], logits(ours, b)) <= 1e-5


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_trainable_count_closed_form(encoder):
    m = tunesmith.apply(small(), "ptuning", num_virtual_tokens=N, encoder=encoder, encoder_hidden=K)
    d = m.get_input_embeddings().weight.shape[1]
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == ptuning_trainable_count(N, d, K, encoder)


@pytest.mark.parametrize("objective", ["sft", "pt", "cls"])
def test_trains_in_the_loop_and_round_trips(tmp_path, objective):
    res = train_and_reload(tmp_path, {"name": "ptuning", "num_virtual_tokens": 4, "encoder_hidden": 16}, objective)
    assert res["change"] > 1e-4 and res["reload_err"] < 1e-6
