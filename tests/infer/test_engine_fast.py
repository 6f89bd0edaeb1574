"""The fast path (static slot cache, compiled step) against the plain path it must equal: greedy
tokens of staggered requests with joins, the buffer shifts at both ends, per-row adapters, and the
grouped-query decode attention against SDPA with repeated keys and values."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tunesmith
from additive_helpers import VOCAB, perturb, small
from helpers import ids, rel_err
from tunesmith.infer.engine import Engine, Request, SamplingParams
from tunesmith.infer.engine import fast
from tunesmith.infer.engine.fast import StaticRunner, decode_attention, split_decode_attention
from tunesmith.methods import registry


def _run(engine, prompts, lengths, models=None, step_joins=True):
    models = models or [None] * len(prompts)
    hs = []
    for i, (p, n, m) in enumerate(zip(prompts, lengths, models)):
        hs.append(engine.submit(Request(prompt=p, model=m, params=SamplingParams(max_tokens=n, ignore_eos=True))))
        if step_joins and i % 2:
            engine.step()           # later requests join a running batch
    engine.run_until_done()
    return [h.result().token_ids for h in hs]


def _prompts(n=6, seed=8):
    x = ids(n, 12, vocab=VOCAB, seed=seed).tolist()
    return [row[: 2 + (3 * i) % 10] for i, row in enumerate(x)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_slots_equal_the_plain_path(arch, tokenizer, monkeypatch):
    shifts, widths = [], set()
    real = StaticRunner._shift
    monkeypatch.setattr(StaticRunner, "_shift", lambda self, d: (shifts.append(d), real(self, d))[1])
    monkeypatch.setattr(fast, "MIN_COLUMNS", 4)          # column buckets 4, 8, 16 and the whole 19
    real_step = StaticRunner._step
    monkeypatch.setattr(StaticRunner, "_step", lambda self, i, p, v: (widths.add(v.shape[1]), real_step(self, i, p, v))[1])
    model = small(arch)
    lengths = [5, 9, 3, 7, 4, 8]
    plain = _run(Engine(model, tokenizer, fast=False, max_batch=4), _prompts(), lengths)
    fast_engine = Engine(model, tokenizer, fast=True, max_batch=4, max_len=19)   # small: both shifts happen
    assert isinstance(fast_engine.routes["base"].lane.runner, StaticRunner)
    assert _run(fast_engine, _prompts(), lengths) == plain
    assert min(shifts) < 0 < max(shifts)     # room made on the left for a long prompt, columns cut at the end
    assert widths == {8, 16, 19}             # the prompts reach past 4 columns before the first step


def test_a_step_attends_over_its_column_bucket_only():
    """Keys past the mask's columns (the unused end of the buffers) are not read: garbage there changes nothing."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    mask = torch.zeros(2, 1, 1, 8)
    want, _ = decode_attention(None, q, k[:, :, :8], v[:, :, :8], mask, scaling=0.3)
    k[:, :, 8:], v[:, :, 8:] = float("nan"), float("nan")
    got, _ = decode_attention(None, q, k, v, mask, scaling=0.3)
    assert torch.equal(got, want)


def test_static_slots_with_per_row_adapters(tmp_path, tokenizer):
    base = small()
    dirs = []
    for i, opts in enumerate([{"r": 4}, {"r": 2, "target_modules": ["q_proj", "o_proj"]}]):
        m = tunesmith.apply(copy.deepcopy(base), "lora", **opts)
        perturb(m, scale=0.3, seed=i)
        dirs.append(registry.attached(m).save(m, tmp_path / str(i), "random:llama"))
    models = ["base", "a0", "a1", "a0", "a1", "base"]
    out = []
    for fast in (False, True):
        engine = Engine(copy.deepcopy(base), tokenizer, fast=fast, max_batch=8, max_len=32)
        for i, d in enumerate(dirs):
            engine.add_adapter(f"a{i}", d)
        out.append(_run(engine, _prompts(), [6, 5, 7, 4, 6, 5], models))
    assert out[0] == out[1]


def test_grouped_decode_attention_equals_sdpa_with_repeated_kv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    valid = torch.rand(3, 10, generator=g) > 0.3
    valid[:, -1] = True
    mask = torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    got, _ = decode_attention(None, q, k, v, mask, scaling=0.25)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask,
                                          scale=0.25).transpose(1, 2)
    assert got.shape == (3, 1, 8, 16) and rel_err(got, want) < 1e-6


def _grouped_inputs(w, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 8, 1, 16, generator=g).to(dtype)
    k, v = torch.randn(3, 2, w + 5, 16, generator=g).to(dtype), torch.randn(3, 2, w + 5, 16, generator=g).to(dtype)
    valid = torch.rand(3, w, generator=g) > 0.3
    valid[:, -1] = True
    mask = torch.where(valid, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
    return q, k, v, mask


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_split_decode_attention_equals_sdpa_over_the_mask_columns(monkeypatch, dtype, tol):
    """Scores, fp32 softmax and chunked value sums (4 chunks of 8 columns) give SDPA's answer over the
    mask's columns; the columns past them (garbage here) are never read."""
    monkeypatch.setattr(fast, "SPLIT_CHUNK", 8)
    q, k, v, mask = _grouped_inputs(32, dtype)
    k[:, :, 32:], v[:, :, 32:] = float("nan"), float("nan")
    got, _ = split_decode_attention(None, q, k, v, mask, scaling=0.25)
    kr, vr = k[:, :, :32].float().repeat_interleave(4, 1), v[:, :, :32].float().repeat_interleave(4, 1)
    want = F.scaled_dot_product_attention(q.float(), kr, vr, attn_mask=mask.float(), scale=0.25).transpose(1, 2)
    assert got.shape == (3, 1, 8, 16) and got.dtype == dtype and rel_err(got.float(), want) < tol


def test_decode_attention_splits_from_split_from_columns_in_whole_chunks(monkeypatch):
    calls = []
    real = fast.split_decode_attention
    monkeypatch.setattr(fast, "split_decode_attention",
                        lambda *a, **k: (calls.append((a[4].shape[-1], k["chunk"])), real(*a, **k))[1])
    monkeypatch.setattr(fast, "SPLIT_FROM", 16)
    monkeypatch.setattr(fast, "SPLIT_CHUNK", 8)
    for w in (8, 12, 16, 20, 32):
        q, k, v, mask = _grouped_inputs(w)
        got, _ = decode_attention(None, q, k, v, mask, scaling=0.25)
        want = F.scaled_dot_product_attention(q, k[:, :, :w].repeat_interleave(4, 1), v[:, :, :w].repeat_interleave(4, 1),
                                              attn_mask=mask, scale=0.25).transpose(1, 2)
        assert rel_err(got, want) < 1e-6, w
    assert calls == [(8, 8), (12, 12), (16, 8), (20, 20), (32, 8)]   # one piece: short, or not whole chunks


def test_static_slots_with_split_attention_equal_the_plain_path(tokenizer, monkeypatch):
    """Buffers from SPLIT_FROM columns on are whole chunks wide (19 -> 24), so the long buckets split."""
    monkeypatch.setattr(fast, "MIN_COLUMNS", 4)
    monkeypatch.setattr(fast, "SPLIT_FROM", 16)
    monkeypatch.setattr(fast, "SPLIT_CHUNK", 8)
    calls = []
    real = fast.split_decode_attention
    monkeypatch.setattr(fast, "split_decode_attention",
                        lambda *a, **k: (calls.append((a[4].shape[-1], k["chunk"])), real(*a, **k))[1])
    model = small()
    lengths = [5, 9, 3, 7, 4, 8]
    plain = _run(Engine(model, tokenizer, fast=False, max_batch=4), _prompts(), lengths)
    engine = Engine(model, tokenizer, fast=True, max_batch=4, max_len=19)
    assert engine.routes["base"].lane.runner.W == 24
    assert _run(engine, _prompts(), lengths) == plain
    assert {c for c in calls if c[0] >= 16} == {(16, 8), (24, 8)} and all(w == c for w, c in calls if w < 16)


def test_column_buckets_double_then_grow_in_half_split_steps(monkeypatch):
    monkeypatch.setattr(fast, "MIN_COLUMNS", 4)
    monkeypatch.setattr(fast, "SPLIT_FROM", 16)
    monkeypatch.setattr(fast, "SPLIT_CHUNK", 8)
    runner = StaticRunner(small(), 0, max_batch=2, max_len=100)
    assert runner.W == 104                                # whole chunks
    got = {}
    for t in (0, 3, 4, 15, 16, 23, 24, 40, 99):
        runner.t = t
        got[t] = runner.columns()
    assert got == {0: 4, 3: 4, 4: 8, 15: 16, 16: 24, 23: 24, 24: 32, 40: 48, 99: 104}


def test_one_compiled_graph_per_batch_bucket_for_every_column_count(tokenizer, monkeypatch):
    """The step compiles once per batch bucket: column buckets 16 and 32 and the whole buffer (40)
    run in that one graph (the buffers' spare column keeps every step's columns non-contiguous)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("eager")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, dynamic=None: real(fn, backend=counter, dynamic=dynamic))
    monkeypatch.setattr(fast, "MIN_COLUMNS", 16)
    torch._dynamo.reset()
    model = small()
    lengths = [20, 26, 3, 25]
    plain = _run(Engine(model, tokenizer, fast=False, max_batch=4), _prompts(4), lengths)
    engine = Engine(model, tokenizer, fast=False, max_batch=4)
    lane = engine.routes["base"].lane
    lane.runner = runner = StaticRunner(model, engine.pad_id, engine.table, max_batch=4, max_len=40,
                                        compile_mode="default")
    widths, compiled = set(), runner.step_fn
    runner.step_fn = lambda i, p, v: (widths.add((i.shape[0], v.shape[1])), compiled(i, p, v))[1]
    assert _run(engine, _prompts(4), lengths) == plain
    assert {w for _, w in widths} == {16, 32, 40} and {b for b, _ in widths} == {2, 4}
    assert counter.frame_count == 2


@pytest.mark.slow
def test_compiled_step_equals_the_plain_path(tokenizer, monkeypatch):
    """The compiled step, its column count dynamic (buckets 16 and 32 here, then the whole 40) and its
    batch buckets static, gives the plain path's tokens, with inductor's one graph per batch bucket."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(fast, "MIN_COLUMNS", 16)
    model = small()
    lengths = [20, 26, 3, 25]
    plain = _run(Engine(model, tokenizer, fast=False, max_batch=4), _prompts(4), lengths)
    engine = Engine(model, tokenizer, fast=False, max_batch=4)
    lane = engine.routes["base"].lane
    lane.runner = StaticRunner(model, engine.pad_id, engine.table, max_batch=4, max_len=40, compile_mode="default")
    counters.clear()
    assert _run(engine, _prompts(4), lengths) == plain
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])   # batch buckets 2 and 4
