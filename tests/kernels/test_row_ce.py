"""Each row's cross-entropy and logit gradient (kernels/row_ce.py), and the per-row log-probs through a
frozen head built on it (kernels/cross_entropy.linear_logps): against PyTorch's own formulas on the CPU,
and the Triton kernel against its reference on CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from tunesmith.kernels import row_ce
from tunesmith.kernels.cross_entropy import linear_logps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _logits(n=7, v=300, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return x, y


def test_reference_is_cross_entropy_and_softmax_minus_one_hot():
    x, y = _logits()
    loss, grad = row_ce.row_ce_reference(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, reduction="none"))
    torch.testing.assert_close(grad, torch.softmax(x, -1) - F.one_hot(y, x.shape[1]).to(x.dtype))
    assert loss.dtype == torch.float64 and grad.dtype == x.dtype
    low, grad16 = row_ce.row_ce_reference(x.to(torch.bfloat16), y)
    assert low.dtype == torch.float32 and grad16.dtype == torch.bfloat16


def test_off_cuda_the_logits_are_left_alone():
    x, y = _logits(dtype=torch.float32)
    before = x.clone()
    assert not row_ce.available(x)
    loss, grad = row_ce.row_ce_(x, y)
    assert torch.equal(x, before) and grad is not x
    torch.testing.assert_close(loss, F.cross_entropy(x, y, reduction="none"))


@pytest.mark.parametrize("chunk_elements", [300 * 3, 1 << 25])   # 3 rows a chunk; one chunk
def test_linear_logps_equal_log_softmax_with_gradients(chunk_elements):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, generator=g, dtype=torch.float64)
    b = torch.randn(300, generator=g, dtype=torch.float64)
    y = torch.randint(0, 300, (11,), generator=g)
    up = torch.randn(11, generator=g, dtype=torch.float64)          # a per-row upstream gradient
    got = linear_logps(h, w, y, b, chunk_elements)
    (got * up).sum().backward()
    got_grad, h.grad = h.grad.clone(), None
    want = F.log_softmax(F.linear(h, w, b), -1).gather(1, y[:, None]).squeeze(1)
    (want * up).sum().backward()
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(got_grad, h.grad)


def test_linear_logps_without_gradients_keeps_nothing_for_backward():
    h = torch.randn(5, 8, dtype=torch.float64)
    w = torch.randn(40, 8, dtype=torch.float64)
    y = torch.randint(0, 40, (5,))
    with torch.no_grad():
        out = linear_logps(h, w, y)
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.log_softmax(h @ w.T, -1).gather(1, y[:, None]).squeeze(1))


@cuda
@pytest.mark.parametrize("dtype, v", [(torch.bfloat16, 128256), (torch.float32, 50), (torch.float16, 9000)])
def test_triton_kernel_matches_its_reference(dtype, v):
    x, y = _logits(n=33, v=v, dtype=dtype, device="cuda")
    want_loss, want_grad = row_ce.row_ce_reference(x, y)
    work = x.clone()
    assert row_ce.available(work)
    loss, grad = row_ce.row_ce_(work, y)
    assert grad is work                                          # written over the logits
    assert rel_err(loss, want_loss) < 1e-5
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tol, atol=tol)


@cuda
def test_linear_logps_on_cuda_equal_the_cpu_values():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(70, 64, generator=g, dtype=torch.float32)
    w = torch.randn(5000, 64, generator=g, dtype=torch.float32) * 0.1
    y = torch.randint(0, 5000, (70,), generator=g)
    want = linear_logps(h, w, y, chunk_elements=5000 * 16)
    hc = h.cuda().requires_grad_()
    got = linear_logps(hc, w.cuda(), y.cuda(), chunk_elements=5000 * 16)
    got.sum().backward()
    hr = h.clone().requires_grad_()
    linear_logps(hr, w, y, chunk_elements=5000 * 16).sum().backward()
    assert rel_err(got.detach().cpu(), want) < 1e-5
    assert rel_err(hc.grad.cpu(), hr.grad) < 1e-4
