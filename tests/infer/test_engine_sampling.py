"""Sampling in the engine: transformers' generate as the oracle for greedy + repetition penalty,
seeded rows independent of their batch companions, filters that hold, and log-probabilities equal
to a full forward pass."""
from __future__ import annotations

import pytest
import torch

from additive_helpers import VOCAB, small
from helpers import ids
from tunesmith.errors import ConfigError
from tunesmith.infer.engine import Engine, Request, SamplingParams
from tunesmith.infer.engine.sampling import processors


def _prompt(seed=2, n=7):
    return ids(1, n, vocab=VOCAB, seed=seed)[0].tolist()


def _engine(tokenizer, **kw):
    return Engine(small(), tokenizer, fast=False, **kw)


def test_greedy_with_repetition_penalty_equals_hf_generate(tokenizer):
    engine = _engine(tokenizer)
    p = _prompt()
    got = engine.generate([p], params=SamplingParams(max_tokens=10, repetition_penalty=1.8, ignore_eos=True))[0]
    x = torch.tensor([p])
    want = engine.base_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10,
                                      do_sample=False, repetition_penalty=1.8, pad_token_id=0, eos_token_id=None)
    assert got.token_ids == want[0, len(p):].tolist()
    plain = engine.generate([p], params=SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert plain.token_ids != got.token_ids   # the penalty changed something


def test_top_k_one_is_greedy(tokenizer):
    engine = _engine(tokenizer)
    p = _prompt()
    greedy = engine.generate([p], params=SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    k1 = engine.generate([p], params=SamplingParams(max_tokens=8, temperature=1.3, top_k=1, ignore_eos=True))[0]
    assert k1.token_ids == greedy


def test_seeded_rows_do_not_depend_on_their_batch(tokenizer):
    engine = _engine(tokenizer)
    p = _prompt()
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    alone = engine.generate([p], params=sp)[0].token_ids
    others = [Request(prompt=_prompt(s), params=SamplingParams(max_tokens=5, temperature=0.7, ignore_eos=True))
              for s in (3, 4)]
    hs = [engine.submit(r) for r in others[:1]] + [engine.submit(Request(prompt=p, params=sp))]
    hs += [engine.submit(r) for r in others[1:]]
    engine.run_until_done()
    assert hs[1].result().token_ids == alone
    other_seed = engine.generate([p], params=sp.replace(seed=12))[0].token_ids
    assert other_seed != alone


def _step_logits(model, seq):
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq])).logits[0, -1].float()


@pytest.mark.parametrize("filt", [{"top_k": 3}, {"top_p": 0.3}, {"min_p": 0.5}])
def test_sampled_tokens_stay_inside_the_filter(tokenizer, filt):
    engine = _engine(tokenizer)
    p = _prompt()
    sp = SamplingParams(max_tokens=10, temperature=1.5, seed=5, ignore_eos=True, logprobs=True,
                        processed_logprobs=True, **filt)
    res = engine.generate([p], params=sp)[0]
    procs = processors(sp)
    seq = list(p)
    for tok, lp in zip(res.token_ids, res.logprobs):
        scores = procs(torch.tensor([seq]), _step_logits(engine.base_model, seq)[None])[0]
        assert torch.isfinite(scores[tok])                               # never a filtered token
        assert lp == pytest.approx(float(scores.log_softmax(-1)[tok]), abs=1e-4)
        seq.append(tok)


def test_logprobs_are_the_models_raw_distribution(tokenizer):
    engine = _engine(tokenizer)
    p = _prompt()
    res = engine.generate([p], params=SamplingParams(max_tokens=6, temperature=0.8, seed=1, ignore_eos=True,
                                                     logprobs=True, top_logprobs=3))[0]
    with torch.no_grad():
        full = engine.base_model(input_ids=torch.tensor([p + res.token_ids])).logits[0].float().log_softmax(-1)
    for i, (tok, lp, top) in enumerate(zip(res.token_ids, res.logprobs, res.top_logprobs)):
        row = full[len(p) - 1 + i]
        assert lp == pytest.approx(float(row[tok]), abs=1e-4)
        want = row.topk(3)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)


def test_parameter_errors_name_the_field():
    for bad, field in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                       ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                       ({"top_logprobs": 99}, "top_logprobs")]:
        with pytest.raises(ConfigError, match=field):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)


def test_hashed_race_draws_from_the_distribution_and_repeats_per_key():
    """The seeded sampler's tokens: frequencies within a chi-square bound of p (over positions of one seed,
    and over seeds at one position), never a zero-probability token, the same token for the same key
    whatever the batch holds, and a different sequence for another seed."""
    from tunesmith.infer.engine.sampling import race
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0, 0.0])
    n = 20_000
    for keys in ([(7, t) for t in range(n)], [(s, 3) for s in range(n)], [((1 << 61) + s, 0) for s in range(n)]):
        tokens = race(p.expand(n, -1), keys)
        counts = torch.bincount(tokens, minlength=len(p)).double()
        assert counts[6:].sum() == 0
        expected = p[:6].double() * n
        chi2 = float(((counts[:6] - expected) ** 2 / expected).sum())
        assert chi2 < 20.5, chi2                   # 5 degrees of freedom: P(chi2 > 20.5) ≈ 0.001
    q = torch.softmax(torch.randn(5, 300), -1)
    keys = [(11, 0), (11, 1), (12, 0), (3, 9), (11, 0)]
    alone = [int(race(q[i:i + 1], [k])[0]) for i, k in enumerate(keys)]
    assert race(q, keys).tolist() == alone
    assert race(q.flip(0), keys[::-1]).tolist() == alone[::-1]
    first = race(q[0].expand(64, -1), [(11, t) for t in range(64)])
    assert not torch.equal(first, race(q[0].expand(64, -1), [(12, t) for t in range(64)]))


def test_a_row_with_nan_probabilities_fails_with_a_clear_error():
    from tunesmith.infer.engine.sampling import choose

    class Row:
        def __init__(self, seed):
            self.params = SamplingParams(temperature=1.0, seed=seed)
            self.prompt_ids, self.out_ids = [1, 2], []

    logits = torch.randn(3, 50)
    assert len(choose(logits, [Row(1), Row(None), Row(2)]).ids) == 3
    logits[1, 4] = float("nan")
    for rows in ([Row(1), Row(2), Row(3)], [Row(None), Row(None), Row(None)], [Row(1), Row(None), Row(2)]):
        with pytest.raises(RuntimeError, match="inf.*nan"):   # ours, or torch.multinomial's for unseeded rows
            choose(logits, rows)


@pytest.mark.slow
def test_the_compiled_race_draws_what_the_eager_one_does():
    """CUDA runs the race through torch.compile (one fused kernel): compiled here on the CPU, it must give
    the eager tokens exactly (the hash is integer arithmetic; the argmax reads the same floats)."""
    from tunesmith.infer.engine.sampling import _race, _token_weyl
    probs = torch.softmax(torch.randn(6, 1000) * 3, -1)
    words = torch.tensor([[s & 0xFFFFFFFF, s >> 32, t] for s, t in
                          [(1, 0), (1, 1), (2, 0), ((1 << 40) + 7, 5), (99, 1000), (3, 2)]])
    weyl = _token_weyl(1000, torch.device("cpu"))
    assert torch.equal(torch.compile(_race, dynamic=True)(probs, words, weyl), _race(probs, words, weyl))
