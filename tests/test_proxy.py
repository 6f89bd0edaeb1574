"""Proxy-tuning (Liu et al. 2024): combined logits equal base + α(expert − anti-expert); cached
decoding equals a hand loop; a tuned expert moves the base model toward what it was tuned for;
tunesmith runs work as experts through ``generate``."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import tunesmith
from additive_helpers import VOCAB, small
from helpers import alpaca_rows, ids, run_config, tiny, write_jsonl
from tunesmith.infer import ProxyTuned, generate
from tunesmith.infer.proxy import Sampler, positions


def _models():
    return small(seed=1), small(seed=2), small(seed=3)


def _logits(m, x, mask):
    with torch.no_grad():
        return m.eval()(input_ids=x, attention_mask=mask).logits


def test_combined_logits_are_the_formula():
    base, expert, anti = _models()
    x = ids(2, 6, vocab=VOCAB)
    mask = torch.ones_like(x)
    for alpha in (1.0, 0.5):
        got = ProxyTuned(base, expert, anti, alpha).logits(x, mask)
        want = _logits(base, x, mask) + alpha * (_logits(expert, x, mask) - _logits(anti, x, mask))
        assert torch.equal(got, want)


def test_common_vocabulary_prefix():
    base, anti = small(seed=1), small(seed=3)
    expert = tiny("llama", seed=2, vocab_size=VOCAB + 64)  # padded embedding table
    x = ids(1, 5, vocab=VOCAB)
    got = ProxyTuned(base, expert, anti).logits(x)
    assert got.shape[-1] == VOCAB
    assert torch.equal(got, _logits(base, x, None) + (_logits(expert, x, None)[..., :VOCAB] - _logits(anti, x, None)))


def test_cached_decoding_equals_a_loop_without_cache():
    base, expert, anti = _models()
    tunesmith.apply(expert, "prompt", num_virtual_tokens=3)  # an expert with virtual tokens inside
    proxy = ProxyTuned(base, expert, anti)
    x = ids(2, 6, vocab=VOCAB, seed=4)
    mask = torch.ones_like(x)
    x[0, :2], mask[0, :2] = 0, 0
    got = proxy.generate(x, mask, max_new_tokens=5, sampler=Sampler(), eos_token_id=None, pad_token_id=0)
    out, m = x, mask
    for _ in range(5):
        step = [mod(input_ids=out, attention_mask=m, position_ids=positions(m)).logits[:, -1]
                for mod in (base, expert, anti)]
        nxt = proxy.combine(*step).argmax(-1, keepdim=True)
        out, m = torch.cat([out, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(got, out)


def test_tuned_expert_steers_the_base_toward_its_tuning():
    base, anti = small(seed=1), small(seed=2)
    expert = tunesmith.apply(copy.deepcopy(anti), "full")
    target = 7
    opt = torch.optim.AdamW(expert.parameters(), lr=1e-2)
    for i in range(15):  # tune the small model to answer `target`
        x = ids(4, 6, vocab=VOCAB, seed=100 + i)
        loss = F.cross_entropy(expert(input_ids=x).logits[:, -1], torch.full((4,), target))
        loss.backward()
        opt.step()
        opt.zero_grad()
    x = ids(8, 6, vocab=VOCAB, seed=999)  # unseen contexts
    p_base = _logits(base, x, None)[:, -1].softmax(-1)[:, target]
    p_proxy = ProxyTuned(base, expert, anti).logits(x)[:, -1].softmax(-1)[:, target]
    assert (p_proxy > p_base).all() and p_proxy.mean() > 0.5 > p_base.mean()


def test_generate_with_a_tunesmith_run_as_expert(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    run_dir, _ = tunesmith.train(run_config(f, tmp_path, {"name": "prompt", "num_virtual_tokens": 3}, max_steps=1))
    base, tok = tunesmith.load(run_dir, device="cpu")
    plain = generate(base, ["Add 2 and 3.", "Add 10 and 1."], tokenizer=tok, max_new_tokens=4)
    # expert = anti-expert: the difference cancels and the base model's greedy output remains
    same = generate(base, ["Add 2 and 3.", "Add 10 and 1."], tokenizer=tok, max_new_tokens=4,
                    expert=run_dir, anti_expert=str(run_dir), device="cpu")
    assert same == plain
