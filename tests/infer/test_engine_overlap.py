"""The fast path's overlapped steps: the engine queues a decode step, fed the device-side picks of the
step in flight, before the host reads those picks. Rows finishing, cancelled, failing, joining and
asking for log-probs or a repetition penalty (which reads the host's history, so those steps do not
overlap) give what the plain path gives."""
from __future__ import annotations

import pytest
import torch

from additive_helpers import VOCAB, small
from helpers import ids
from tunesmith.infer.engine import Engine, Request, SamplingParams
from tunesmith.infer.engine.fast import StaticRunner
from tunesmith.infer.engine.sampling import Pending


def _prompts(n=6, seed=4):
    x = ids(n, 10, vocab=VOCAB, seed=seed).tolist()
    return [row[: 3 + (2 * i) % 7] for i, row in enumerate(x)]


def _run(engine, prompts, params, join_every=2):
    hs = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        hs.append(engine.submit(Request(prompt=p, params=sp)))
        if i % join_every == join_every - 1:
            engine.step()
            engine.step()       # later rows join a batch with a step in flight
    engine.run_until_done()
    return [h.result() for h in hs]


def test_a_step_is_queued_before_the_last_one_is_read(tokenizer, monkeypatch):
    events = []
    decode, result = StaticRunner.decode, Pending.result
    monkeypatch.setattr(StaticRunner, "decode", lambda self, last: (events.append(("decode", torch.is_tensor(last))),
                                                                     decode(self, last))[1])
    monkeypatch.setattr(Pending, "result", lambda self: (events.append(("read",)), result(self))[1])
    engine = Engine(small(), tokenizer, fast=True, max_batch=4)
    h = engine.submit(Request(prompt=[5, 6, 7], params=SamplingParams(max_tokens=5, ignore_eos=True)))
    engine.run_until_done()
    assert len(h.result().token_ids) == 5
    # the prefill's pick, then a step from the host's ids; from then on each step is queued from the
    # device's picks before the previous step is read, except after the one that gives the last token
    assert events == [("read",), ("decode", False)] + [("decode", True), ("read",)] * 3 + [("read",)]


def test_overlapped_rows_equal_the_plain_path(tokenizer):
    prompts = _prompts()
    base = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (7, 3, 9, 5, 8, 6)]
    plain = _run(Engine(small(), tokenizer, fast=False, max_batch=4), prompts, base)
    stop_tok = plain[0].token_ids[3]                       # row 0 stops at its 4th token
    params = [base[0].replace(stop_token_ids=(stop_tok,), ignore_eos=False),
              base[1].replace(logprobs=True, top_logprobs=3),
              base[2].replace(temperature=0.9, top_k=20, seed=11),
              base[3].replace(repetition_penalty=1.3),       # steps with this row run without overlap
              base[4].replace(temperature=1.0, top_p=0.8, seed=12, logprobs=True),
              base[5]]
    want = _run(Engine(small(), tokenizer, fast=False, max_batch=4), prompts, params)
    got = _run(Engine(small(), tokenizer, fast=True, max_batch=4), prompts, params)
    assert len(want[0].token_ids) == 4 and want[0].finish_reason == "stop"
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason and g.text == w.text
        assert (g.logprobs is None) == (w.logprobs is None)
        if w.logprobs is not None:
            assert g.logprobs == pytest.approx(w.logprobs, rel=1e-4, abs=1e-5)
    assert [t for t, _ in got[1].top_logprobs[2]] == [t for t, _ in want[1].top_logprobs[2]]


def test_a_cancelled_row_leaves_the_others_as_they_were(tokenizer):
    prompts = _prompts(2)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    solo = Engine(small(), tokenizer, fast=True, max_batch=4).generate([prompts[1]], params=params)[0].token_ids
    engine = Engine(small(), tokenizer, fast=True, max_batch=4)
    a, b = (engine.submit(Request(prompt=p, params=params)) for p in prompts)
    for _ in range(4):
        engine.step()
    assert engine.routes["base"].lane.ahead is not None      # a step is in flight when the row goes
    engine.cancel(a)
    engine.run_until_done()
    assert a.result().finish_reason == "cancelled" and b.result().token_ids == solo


def test_a_nan_row_in_flight_fails_clearly_and_the_engine_goes_on(tokenizer, monkeypatch):
    """The NaN row's pick (-1) is fed to the step queued after it as token 0, so that step runs; the
    row fails when its pick is read, and later requests decode as usual."""
    step = StaticRunner._step
    calls = {"n": 0}

    def poisoned(self, i, p, v):
        calls["n"] += 1
        out = step(self, i, p, v)
        return torch.full_like(out, float("nan")) if calls["n"] == 3 else out
    monkeypatch.setattr(StaticRunner, "_step", poisoned)
    engine = Engine(small(), tokenizer, fast=True, max_batch=4)
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    out = engine.generate(_prompts(2), params=sp)
    assert all(o.finish_reason == "error" and "not a distribution" in o.error for o in out)
    again = engine.generate(_prompts(1), params=sp)[0]
    assert again.finish_reason == "length" and len(again.token_ids) == 8
