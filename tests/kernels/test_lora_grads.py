"""One pass over LoRA's output gradient for g B and gᵀ u (kernels/lora_grads.py), against torch.mm."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from tunesmith.kernels import lora as L
from tunesmith.kernels.lora_grads import lora_grads, lora_grads_reference, usable

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the kernel is Triton)")


def _case(n, d, r, device="cpu", dtype=torch.float32, row_stride=None, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    wide = torch.randn(n, row_stride or d, generator=g, device=device, dtype=dtype)
    grad = wide[:, :d]                                   # rows strided when row_stride > d
    b = torch.randn(d, r, generator=g, device=device, dtype=dtype) * 0.1
    u = torch.randn(n, r, generator=g, device=device, dtype=dtype)
    return grad, b, u


def test_cpu_takes_the_reference():
    g, b, u = _case(37, 50, 16)
    assert not usable(g, b)
    gu, gb = lora_grads(g, b, u)
    assert torch.equal(gu, g @ b) and torch.equal(gb, g.t() @ u)


@cuda
def test_what_the_kernel_takes():
    g = torch.empty(10, 64, device="cuda", dtype=torch.bfloat16)
    assert usable(g, torch.empty(64, 16, device="cuda", dtype=torch.bfloat16))
    assert not usable(g, torch.empty(64, 8, device="cuda", dtype=torch.bfloat16))     # no rank-8 product tile
    assert not usable(g.float(), torch.empty(64, 16, device="cuda"))                 # fp32 keeps torch.mm
    long = torch.empty(64 * 256 + 1, 64, device="cuda", dtype=torch.bfloat16)
    assert not usable(long, torch.empty(64, 16, device="cuda", dtype=torch.bfloat16))


@cuda
@pytest.mark.parametrize("n,d,r,row_stride", [(4096, 14336, 16, None), (1000, 1024, 16, None),
                                              (300, 4096, 32, None), (257, 100, 64, None),
                                              (513, 1024, 16, 1536)])
def test_kernel_matches_mm(n, d, r, row_stride):
    g, b, u = _case(n, d, r, "cuda", torch.bfloat16, row_stride)
    assert usable(g, b)
    gu, gb = lora_grads(g, b, u)
    ref_gu, ref_gb = lora_grads_reference(g.float(), b.float(), u.float())   # exact sums of the same inputs
    assert gu.dtype == gb.dtype == torch.bfloat16
    assert rel_err(gu.float(), ref_gu) < 1e-2 and rel_err(gb.float(), ref_gb) < 1e-2
    mm_gu, mm_gb = lora_grads_reference(g, b, u)                               # what torch.mm rounds to
    assert rel_err(gu.float(), mm_gu.float()) < 1e-2 and rel_err(gb.float(), mm_gb.float()) < 1e-2


@cuda
def test_compiled_lora_layer_uses_it_and_keeps_its_gradients(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    a = (torch.randn(16, 256, device="cuda") * 0.05).requires_grad_()
    b = (torch.randn(512, 16, device="cuda") * 0.05).requires_grad_()

    def grads(fused: bool):
        monkeypatch.setattr(L, "usable", lambda g, bb: fused and usable(g, bb))
        torch._dynamo.reset()
        f = torch.compile(lambda x: L.lora_linear(x, w, None, a, b, 2.0))
        for t in (x, a, b):
            t.grad = None
        calls = []
        real = L.lora_grads
        monkeypatch.setattr(L, "lora_grads", lambda *args: calls.append(1) or real(*args))
        f(x).float().pow(2).sum().backward()
        return [t.grad.float().clone() for t in (x, a, b)], len(calls)

    got, n_fused = grads(True)
    ref, n_ref = grads(False)
    assert n_fused == 1 and n_ref == 0
    for g1, g0 in zip(got, ref):
        assert rel_err(g1, g0) < 2e-2
