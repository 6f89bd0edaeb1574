"""Chunked linear cross-entropy (kernels/cross_entropy.py) and the chunked causal-LM loss, on CPU."""
from __future__ import annotations

import pytest
import torch

from helpers import OnDevice, ids, rel_err, tiny
from tunesmith.config import TrainConfig
from tunesmith.data.collate import HOST, to_device
from tunesmith.data.packing import real_tokens
from tunesmith.kernels import cross_entropy as CE
from tunesmith.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from tunesmith.train.objectives.causal_lm import ChunkedLoss, LogitsLoss, CausalLM, next_token_labels


def _case(dtype=torch.float64, n=37, d=16, v=50, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    return h, w, b, labels


def _grads(fn, h, w, b, labels, **kw):
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    loss = fn(h, w, labels, b, **kw)
    (loss * 0.37).backward()
    return [loss.detach()] + [t.grad.clone() for t in (h, w, b) if t is not None]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_elements", [50 * 5, 1 << 27])  # 5 rows a chunk; one chunk
def test_matches_reference_float64(bias, chunk_elements):
    case = _case(bias=bias)
    got = _grads(linear_cross_entropy, *case, chunk_elements=chunk_elements)
    ref = _grads(linear_cross_entropy_reference, *case)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("bias", [False, True])   # a trained bias keeps the eager chunk loop
def test_compiled_chunks_match_reference_float64(bias, monkeypatch):
    calls = []
    compiled = CE._compiled_chunk()
    monkeypatch.setattr(CE, "_compiled_chunk", lambda: lambda *a: calls.append(1) or compiled(*a))
    case = _case(bias=bias)
    got = _grads(linear_cross_entropy, *case, chunk_elements=50 * 5, compiled=True)  # ragged last chunk
    ref = _grads(linear_cross_entropy_reference, *case)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-10
    assert len(calls) == (0 if bias else 6)   # 26 labelled rows in chunks of 5


@pytest.mark.slow
def test_train_compile_compiles_the_chunked_loss():
    objective = CausalLM()
    objective.configure(TrainConfig(chunked_ce=True, compile=True))
    assert isinstance(objective.lm_loss, ChunkedLoss) and objective.lm_loss.compiled
    objective.configure(TrainConfig(chunked_ce=True))
    assert not objective.lm_loss.compiled


@pytest.mark.slow
def test_compiled_chunks_write_the_gradient_in_the_head_dtype_under_autocast():
    h, w, b, labels = _case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(linear_cross_entropy, h, w, b, labels, chunk_elements=500, compiled=True)
        eager = _grads(linear_cross_entropy, h, w, b, labels, chunk_elements=500)
    for a, r in zip(got, eager):
        assert a.dtype == r.dtype and rel_err(a.float(), r.float()) < 1e-2


def test_bf16_autocast_close_to_fp64():
    h, w, b, labels = _case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(linear_cross_entropy, h, w, b, labels, chunk_elements=500)
    ref = _grads(linear_cross_entropy_reference, h.detach().double().requires_grad_(),
                 w.detach().double().requires_grad_(), None, labels)
    assert got[1].dtype == torch.float32
    for a, r in zip(got, ref):
        assert rel_err(a.float(), r) < 2e-2


def test_all_ignored_gives_zero_and_no_nan():
    h, w, _, labels = _case()
    labels[:] = -100
    loss = linear_cross_entropy(h, w, labels)
    loss.backward()
    assert float(loss) == 0.0 and torch.isfinite(h.grad).all()


def test_frozen_head_skips_weight_grad():
    h, w, _, labels = _case()
    w.requires_grad_(False)
    linear_cross_entropy(h, w, labels).backward()
    assert w.grad is None and h.grad is not None


def test_chunked_causal_lm_loss_matches_logits_loss():
    model = tiny("llama")
    x = ids(2, 10, vocab=model.config.vocab_size)
    labels = x.clone()
    labels[0, :4] = -100
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}
    results = []
    for loss_fn in (LogitsLoss(), ChunkedLoss()):
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) < 1e-5
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(g1, g0) if b.abs().sum() > 0)


def test_objective_flag(monkeypatch):
    monkeypatch.setenv("TUNESMITH_CHUNKED_CE", "1")
    assert isinstance(CausalLM().lm_loss, ChunkedLoss)
    monkeypatch.setenv("TUNESMITH_CHUNKED_CE", "0")
    assert isinstance(CausalLM().lm_loss, LogitsLoss)
    assert isinstance(CausalLM(chunked=True).lm_loss, ChunkedLoss)


def test_next_token_labels():
    labels = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert next_token_labels(labels).tolist() == [2, 3, -100, -100, 6, -100]


# -- rows found on the host: no device-to-host sync in the middle of a step ---------------------------
def test_rows_given_match_rows_found():
    h, w, _, labels = _case()
    rows = CE.labelled_rows(labels, h.device)
    assert rows.tolist() == [i for i, y in enumerate(labels.tolist()) if y != -100]
    got = _grads(linear_cross_entropy, h, w, None, labels, rows=rows, chunk_elements=50 * 5)
    ref = _grads(linear_cross_entropy, h, w, None, labels, chunk_elements=50 * 5)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert CE.labelled_rows(torch.tensor([3, 1, 4]), h.device) is None   # every row: no selection at all


def test_host_reads_are_detected():
    with pytest.raises(AssertionError, match="nonzero"):
        (torch.tensor([1, -100]).as_subclass(OnDevice) != -100).nonzero()


def test_chunked_loss_and_counts_read_labels_on_the_host():
    """With the CPU copy that ``to_device`` keeps, the loss finds its rows and the loop its counts
    without reading a device tensor; without it, the loss reads the device labels (which is a sync)."""
    model = tiny("llama")
    x = ids(2, 10, vocab=model.config.vocab_size)
    labels = x.clone()
    labels[0, :4] = -100
    cpu = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}
    batch = to_device(cpu, torch.device("cpu"))
    assert batch[HOST]["labels"] is labels and set(batch[HOST]) == set(cpu)
    batch["labels"] = batch["labels"].as_subclass(OnDevice)   # (the model's mask reads attention_mask)
    objective = CausalLM(chunked=True)
    loss = objective.lm_loss(model, batch)
    want = ChunkedLoss()(model, cpu)
    assert torch.equal(loss.as_subclass(torch.Tensor), want)
    assert objective.count(batch) == 9 + 6   # targets: row 0 loses 3 of its 9 to the mask
    assert real_tokens({**batch, "attention_mask": batch["attention_mask"].as_subclass(OnDevice)}) == 20
    del batch[HOST]
    with pytest.raises(AssertionError, match="read a device tensor"):
        objective.lm_loss(model, batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rows_given_need_no_sync_on_cuda():
    h, w, _, labels = (t.cuda() if t is not None else None for t in _case(torch.float32))
    rows = CE.labelled_rows(labels.cpu(), h.device)
    torch.cuda.set_sync_debug_mode("error")   # the forward, where the rows were found on the device
    try:
        loss = linear_cross_entropy(h, w, labels, rows=rows)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = linear_cross_entropy_reference(h.detach(), w.detach(), labels)
    assert rel_err(loss.detach(), ref) < 1e-5
    with pytest.raises(RuntimeError, match="synchroniz"):   # what the default does
        torch.cuda.set_sync_debug_mode("error")
        try:
            linear_cross_entropy(h, w, labels)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_chunk_loss_is_finite_for_labels_far_below_the_maximum():
    """A label whose logit sits 2·10⁴ below the row's maximum: its probability is 0 in fp32, yet the
    loss is lse − logit (2·10⁴ a row), not −log(0), and the gradient is softmax − one-hot."""
    logits = torch.full((2, 50), -1e4)
    logits[:, 0] = 1e4
    labels = torch.tensor([3, 0])
    loss, grad = CE.chunk_loss_and_grad(logits, labels)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2e4, rel=1e-6)
    want = torch.zeros(2, 50)
    want[:, 0] = 1.0
    want[0, 3] -= 1.0
    want[1, 0] -= 1.0
    torch.testing.assert_close(grad, want)
    compiled_loss, compiled_grad = CE._compiled_chunk()(logits, labels)
    torch.testing.assert_close(compiled_loss, loss)
    torch.testing.assert_close(compiled_grad, grad)


@pytest.mark.slow
def test_compiled_chunk_silences_only_inductors_online_softmax_notice(monkeypatch):
    """On CUDA, inductor warns once when it reduces a small chunk in split passes instead of one online
    pass; a run would print it though the values are the same. Other warnings still show."""
    import warnings
    monkeypatch.setattr(CE, "_compiled", None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        CE._compiled_chunk()
        warnings.warn("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction.", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in seen] == ["something else"]
