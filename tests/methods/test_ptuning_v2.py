"""P-tuning v2: the deep-prompt computation written out (BERT encoder layers with [P_k; K], [P_v; V]),
equality with peft's prefix tuning without projection, closed-form count, the one loop."""
from __future__ import annotations

import pytest
from peft import PrefixTuningConfig, get_peft_model

import tunesmith
from additive_helpers import (VOCAB, bert_deep_prompt_logits, copy, copy_encoder, lm_batches, logits,
                              small, train_and_reload)
from helpers import ids, rel_err
from tunesmith.methods._virtual import dims
from tunesmith.methods.ptuning_v2 import ptuning_v2_trainable_count

N = 3


def test_matches_the_written_out_deep_prompt_computation():
    m = tunesmith.apply(small("bert", "classification"), "ptuning_v2", num_virtual_tokens=N)
    x = ids(2, 7, vocab=VOCAB)
    m.eval()
    expected = bert_deep_prompt_logits(m, x)
    got = m(input_ids=x).logits
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, tunesmith.apply(small("bert", "classification"), "full")(input_ids=x).logits) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_equals_peft_prefix_without_projection(arch):
    base = small(arch)
    ours = tunesmith.apply(copy.deepcopy(base), "ptuning_v2", num_virtual_tokens=N)
    theirs = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                                    prefix_projection=False))
    copy_encoder(ours, theirs)
    b = lm_batches(1)[0]
    assert rel_err(logits(ours, b), logits(theirs, b)) <= 1e-5


def test_trainable_count_closed_form():
    m = tunesmith.apply(small("qwen2"), "ptuning_v2", num_virtual_tokens=N)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == ptuning_v2_trainable_count(m, N)


@pytest.mark.parametrize("objective", ["sft", "pt", "cls"])
def test_trains_in_the_loop_and_round_trips(tmp_path, objective):
    res = train_and_reload(tmp_path, {"name": "ptuning_v2", "num_virtual_tokens": 4}, objective)
    assert res["change"] > 1e-4 and res["reload_err"] < 1e-6


def test_tokens_init_is_the_model_reading_sampled_tokens_first():
    """``init: tokens`` (the default) fills the table with the keys and values the frozen model computes for
    n sampled vocabulary tokens: the tuned model on x equals the base model on those tokens followed by x
    (positions included), while ``init: random`` (peft's N(0, 1)) moves the logits further from the base's."""
    import torch
    base = small("llama")
    vocab = base.get_input_embeddings().weight.shape[0]
    n = 4
    tokens = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    x = ids(2, 7, vocab=VOCAB)
    with torch.no_grad():
        want = base(input_ids=torch.cat([tokens.expand(2, -1), x], dim=1)).logits[:, n:]
        plain = base(input_ids=x).logits
    ours = tunesmith.apply(copy.deepcopy(base), "ptuning_v2", num_virtual_tokens=n)
    ours.eval()
    with torch.no_grad():
        assert rel_err(ours(input_ids=x).logits, want) <= 1e-5
        randomised = tunesmith.apply(copy.deepcopy(base), "ptuning_v2", num_virtual_tokens=n, init="random")
        randomised.eval()
        far = rel_err(randomised(input_ids=x).logits, plain)
    assert far > 1.5 * rel_err(want, plain)
