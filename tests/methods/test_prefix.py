"""Prefix tuning: peft parity (logits incl. GQA and BERT, 30-step curve), the folded MLP, peft
interop, the gradient-checkpointing guard, closed-form count, the one loop."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import tunesmith
from additive_helpers import (VOCAB, bert_deep_prompt_logits, copy, copy_encoder, curve, lm_batches, logits, max_rel_diff, perturb, small,
                              train_and_reload)
from helpers import ids, peft_oracle, rel_err
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.methods.prefix import prefix_trainable_count
from tunesmith.models.compat import enable_checkpointing

N, H = 4, 16


def _pair(arch="llama", task="causal_lm"):
    base = small(arch, task)
    ours = tunesmith.apply(copy.deepcopy(base), "prefix", num_virtual_tokens=N, reparam_hidden=H, init="random")
    theirs = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS", num_virtual_tokens=N,
        prefix_projection=True, encoder_hidden_size=H))
    copy_encoder(ours, theirs)
    return base, ours, theirs


@pytest.mark.parametrize("arch,task", [("llama", "causal_lm"), ("qwen2", "causal_lm"), ("bert", "classification"),
                                       ("llama", "classification")])
def test_logits_match_peft(arch, task):
    _, ours, theirs = _pair(arch, task)
    perturb(ours.prompt_encoder)  # peft keeps its own copy of the task head
    copy_encoder(ours, theirs)
    b = lm_batches(1)[0]
    with peft_oracle(f"prefix tuning ({task})"):
        expected = logits(theirs, b)
    assert rel_err(logits(ours, b), expected) <= 1e-5


def test_bert_classification_matches_the_written_out_prefix_computation():
    """tunesmith's own reference for prefix tuning on an encoder, independent of peft: the MLP's
    prefix table in every layer's keys and values, the layers written out by hand."""
    m = tunesmith.apply(small("bert", "classification"), "prefix", num_virtual_tokens=N, reparam_hidden=H)
    perturb(m.prompt_encoder)
    x = ids(2, 7, vocab=VOCAB)
    m.eval()
    with torch.no_grad():
        got, expected = m(input_ids=x).logits, bert_deep_prompt_logits(m, x)
    assert rel_err(got, expected) <= 1e-5


def test_loss_curve_matches_peft():
    _, ours, theirs = _pair()
    batches = lm_batches()
    a, b = curve(ours, batches, lr=3e-3), curve(theirs, batches, lr=3e-3)
    assert sum(a[-5:]) / 5 < a[0]
    assert max_rel_diff(a, b) <= 0.01


def test_mlp_is_folded_away_and_peft_loads_it(tmp_path):
    base, ours, _ = _pair("qwen2")
    perturb(ours)
    path = registry.attached(ours).save(ours, tmp_path, "unused")
    loaded = registry.get("prefix").load_artifact(copy.deepcopy(base), path)
    assert not hasattr(loaded.prompt_encoder, "transform")  # inference reads a plain table
    b = lm_batches(1)[0]
    assert rel_err(logits(loaded, b), logits(ours, b)) <= 1e-6
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    assert rel_err(logits(theirs, b), logits(ours, b)) <= 1e-5


def test_gradient_checkpointing_is_refused():
    m = small()
    enable_checkpointing(m)
    method = registry.get("prefix")(registry.build_config({"name": "prefix"}))
    method.apply(m)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        method.prepare(m, iter(()), None)


def test_trainable_count_closed_form():
    m = tunesmith.apply(small("qwen2"), "prefix", num_virtual_tokens=N, reparam_hidden=H)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == prefix_trainable_count(m, N, H)


@pytest.mark.parametrize("objective", ["sft", "pt", "cls"])
def test_trains_in_the_loop_and_round_trips(tmp_path, objective):
    res = train_and_reload(tmp_path, {"name": "prefix", "num_virtual_tokens": 4, "reparam_hidden": 16}, objective)
    assert res["change"] > 1e-4 and res["reload_err"] < 1e-6


def test_decoder_classification_reads_the_last_real_token():
    m = tunesmith.apply(small("llama", "classification"), "prefix", num_virtual_tokens=N, reparam_hidden=H)
    perturb(m)
    b = lm_batches(1)[0]
    x, mask = b["input_ids"][:1, :6], torch.ones(1, 6, dtype=torch.long)
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)  # right padding with pad id 0
    pmask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1)
    a = logits(m, {"input_ids": x, "attention_mask": mask})
    assert rel_err(logits(m, {"input_ids": padded, "attention_mask": pmask}), a) <= 1e-5


def test_tokens_init_starts_as_the_base_model_after_sampled_tokens():
    """``init: tokens`` (the default): the prefix starts at the keys and values of n sampled vocabulary
    tokens (the MLP's last layer zero), so the tuned model on x equals the base on those tokens and x;
    the MLP still trains (its last layer gets a gradient) and the saved table is that prefix."""
    base = small("llama")
    vocab = base.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(0, vocab, (N,), generator=torch.Generator().manual_seed(0))
    x = ids(2, 7, vocab=VOCAB)
    with torch.no_grad():
        want = base(input_ids=torch.cat([tokens.expand(2, -1), x], dim=1)).logits[:, N:]
    ours = tunesmith.apply(copy.deepcopy(base), "prefix", num_virtual_tokens=N, reparam_hidden=H)
    ours.eval()
    got = ours(input_ids=x).logits
    assert rel_err(got.detach(), want) <= 1e-5
    got.float().pow(2).mean().backward()
    last = next(m for m in ours.modules() if hasattr(m, "transform")).transform[2]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
