"""Fused LoRA linear (kernels/lora.py) against its plain-PyTorch reference, on CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers import rel_err, tiny
from tunesmith.api import apply
from tunesmith.kernels import lora as K


def _inputs(dtype, bias=True, seed=0, n=(2, 7), d_in=24, d_out=40, r=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n, d_in, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    b = torch.randn(d_out, generator=g, dtype=dtype) if bias else None
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    bb = torch.randn(d_out, r, generator=g, dtype=a.dtype)
    return x, w, b, a.requires_grad_(), bb.requires_grad_()


def _run(fn, x, w, b, a, bb, s=2.0):
    xs, as_, bs = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    y = fn(xs, w, b, as_, bs, s)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * g).sum().backward()
    return y, xs.grad, as_.grad, bs.grad


@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_float64(bias):
    args = _inputs(torch.float64, bias=bias)
    for got, ref in zip(_run(K.lora_linear, *args), _run(K.lora_linear_reference, *args)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert rel_err(got, ref) < 1e-12


def test_matches_reference_under_bf16_autocast():
    args = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _run(K.lora_linear, *args)
    ref = _run(K.lora_linear_reference, *[t.double() if t is not None else None for t in args])
    assert fused[0].dtype == torch.bfloat16
    assert fused[2].dtype == torch.float32 and fused[3].dtype == torch.float32  # A, B grads in param dtype
    for got, want in zip(fused, ref):
        assert rel_err(got.float(), want) < 2e-2


def test_trainable_bias_uses_reference_and_gets_grad():
    x, w, b, a, bb = _inputs(torch.float64)
    b.requires_grad_()
    assert not K.fusable(w, b, x)
    K.lora_linear(x, w, b, a, bb, 2.0).sum().backward()
    assert b.grad is not None


def test_lora_layer_dispatches_to_fused_op(monkeypatch):
    model = apply(tiny("llama"), "lora", r=4)
    calls = []
    orig = K._LoraDelta.forward
    monkeypatch.setattr(K._LoraDelta, "forward", staticmethod(lambda *a: calls.append(1) or orig(*a)))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, layer.base_layer.in_features)
    y = layer(x)
    assert calls, "LoraLinear.forward did not use the fused op"
    ref = K.lora_linear_reference(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight,
                                  layer.lora_B.weight, layer.scaling)
    assert rel_err(y, ref) < 1e-6


def test_dropout_keeps_unfused_path(monkeypatch):
    model = apply(tiny("llama"), "lora", r=4, dropout=0.1)
    monkeypatch.setattr(K, "lora_linear", lambda *a: pytest.fail("fused op used with dropout"))
    model(input_ids=torch.randint(5, 100, (1, 6)))


def test_checkpoint_recompute_skips_last_base_gemm(monkeypatch):
    """The base node saves nothing, so non-reentrant checkpointing stops before the last base GEMM."""
    torch.manual_seed(0)
    l1, l2 = nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False)
    for layer in (l1, l2):
        layer.weight.requires_grad_(False)
    a1, b1 = torch.randn(2, 8, requires_grad=True), torch.randn(16, 2, requires_grad=True)
    a2, b2 = torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)

    def block(x):
        h = torch.relu(K.lora_linear(x, l1.weight, None, a1, b1, 1.0))
        return K.lora_linear(h, l2.weight, None, a2, b2, 1.0)

    calls = []
    orig = K._FrozenLinear.forward
    monkeypatch.setattr(K._FrozenLinear, "forward", staticmethod(lambda *a: calls.append(1) or orig(*a)))
    x = torch.randn(3, 8, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert len(calls) == 3  # 2 in the forward, 1 in the recomputation (the last GEMM is skipped)
    got = [t.grad.clone() for t in (x, a1, b1, a2, b2)]
    for t in (x, a1, b1, a2, b2):
        t.grad = None
    ref = lambda x: K.lora_linear_reference(torch.relu(K.lora_linear_reference(x, l1.weight, None, a1, b1, 1.0)),
                                            l2.weight, None, a2, b2, 1.0)  # noqa: E731
    ref(x).sum().backward()
    for g, t in zip(got, (x, a1, b1, a2, b2)):
        assert rel_err(g, t.grad) < 1e-5


def test_traceable_form_matches_reference(monkeypatch):
    """Under torch.compile the op takes its side-effect-free form; both forms compute the same."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    args = _inputs(torch.float64)
    for got, ref in zip(_run(K.lora_linear, *args), _run(K.lora_linear_reference, *args)):
        assert rel_err(got, ref) < 1e-12
