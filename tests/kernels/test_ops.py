"""tunesmith's dispatcher operators: plain dispatcher kernels (not custom_op wrappers), the values of
their Python references, and fake kernels that give the real output's shape and dtype."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tunesmith.kernels.dora import kept
from tunesmith.kernels.lora import lora_input_grad, lora_input_grad_sum, lora_output


def test_operators_are_plain_dispatcher_ops():
    for op in (lora_output, lora_input_grad, lora_input_grad_sum, kept):
        assert isinstance(op, torch._ops.OpOverload) and op.namespace == "tunesmith"
        assert not hasattr(op, "_opoverload")  # a custom_op wrapper adds tens of µs of host time a call
        assert op._schema.is_mutable is False  # functional: torch.compile needs no copies around them


def test_values_and_fake_shapes():
    g = torch.Generator().manual_seed(0)
    x, w, u, b, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 6), (7, 6), (5, 2), (7, 2), (7,)))
    torch.testing.assert_close(lora_output(x, w, u, b, None), x @ w.T + u @ b.T)
    torch.testing.assert_close(lora_output(x, w, u, b, bias), x @ w.T + u @ b.T + bias)
    gy, a = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(lora_input_grad(gy, w, u, a), gy @ w + u @ a)
    t = torch.randn(7, generator=g)
    out = kept(t)
    assert torch.equal(out, t) and out.data_ptr() != t.data_ptr()
    mode = FakeTensorMode()
    fx, fw, fu, fb, fg, fa, ft = (mode.from_tensor(v.to(torch.bfloat16)) for v in (x, w, u, b, gy, a, t))
    with mode:
        y = lora_output(fx, fw, fu, fb, None)
        assert y.shape == (5, 7) and y.dtype == torch.bfloat16
        assert lora_input_grad(fg, fw, fu, fa).shape == (5, 6)
        assert kept(ft).shape == (7,)


def test_summed_input_gradient_is_the_sum_of_each_projections():
    """Σᵢ gᵢ W0ᵢ + guᵢ Aᵢ for three projections of different widths reading one input, against the
    per-projection operator and plain products; the fake kernel gives its shape."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    gs, ws = [r(5, 7), r(5, 3), r(5, 3)], [r(7, 6), r(3, 6), r(3, 6)]
    gus, as_ = [r(5, 2), r(5, 2), r(5, 4)], [r(2, 6), r(2, 6), r(4, 6)]
    got = lora_input_grad_sum(gs, ws, torch.cat(gus, 1), torch.cat(as_, 0))
    torch.testing.assert_close(got, sum(lora_input_grad(*p) for p in zip(gs, ws, gus, as_)))
    torch.testing.assert_close(got, sum(gi @ wi + ui @ ai for gi, wi, ui, ai in zip(gs, ws, gus, as_)))
    mode = FakeTensorMode()
    fg, fw = [mode.from_tensor(t) for t in gs], [mode.from_tensor(t) for t in ws]
    fu, fa = mode.from_tensor(torch.cat(gus, 1)), mode.from_tensor(torch.cat(as_, 0))
    with mode:
        fake = lora_input_grad_sum(fg, fw, fu, fa)
        assert fake.shape == (5, 6) and fake.dtype == torch.float64
