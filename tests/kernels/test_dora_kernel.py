"""DoRA without the dense matrix (kernels/dora.py) against the dense formula and tunesmith's DoraLinear."""
from __future__ import annotations

import torch

from helpers import rel_err, tiny
from tunesmith.api import apply
from tunesmith.kernels import dora as K
from tunesmith.kernels.lora import Dequantized, frozen_weight, lora_linear, lora_linear_reference


def _case(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 24, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(40, 24, generator=g, dtype=dtype)
    b = torch.randn(40, generator=g, dtype=dtype) if bias else None
    a = torch.randn(4, 24, generator=g, dtype=dtype, requires_grad=True)
    bb = torch.randn(40, 4, generator=g, dtype=dtype, requires_grad=True)
    m = (torch.rand(40, generator=g, dtype=dtype) + 0.5).requires_grad_()
    return x, w, b, a, bb, m


def _grads(fn, x, w, b, a, bb, m):
    for t in (x, a, bb, m):
        t.grad = None
    y = fn(x, w, b, a, bb, m, 0.7)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    return [y.detach()] + [t.grad.clone() for t in (x, a, bb, m)]


def test_norm_expansion_equals_dense_norm():
    x, w, b, a, bb, m = _case()
    dense = torch.linalg.norm(w + 0.7 * bb @ a, dim=1)
    assert rel_err(K.dora_norm(w, a, bb, 0.7), dense) < 1e-12
    assert rel_err(K.dora_norm(w, a, bb, 0.7, K.weight_sq_norm(w)), dense) < 1e-12


def test_matches_dense_reference_float64():
    case = _case()
    for got, ref in zip(_grads(K.dora_linear, *case), _grads(K.dora_linear_reference, *case)):
        assert rel_err(got, ref) < 1e-10


def test_matches_tunesmith_dora_layer():
    model = apply(tiny("llama"), "dora", r=4)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(2, 6, layer.base_layer.in_features)
    want = layer(x)
    got = K.dora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight,
                        layer.lora_B.weight, layer.lora_magnitude_vector, layer.scaling)
    assert rel_err(got, want) < 1e-5


def test_dequantized_weight_path():
    """A quantized base (here: int8 codes × per-row scale) goes through the same fused op."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (40, 24), generator=g, dtype=torch.int8)

    class Param:
        data, quant_state = codes, torch.rand(40, 1, generator=g) / 100

    q = Dequantized(Param(), lambda data, state: data.float() * state, torch.float32)
    x = torch.randn(7, 24, generator=g, requires_grad=True)
    a = torch.randn(4, 24, generator=g, requires_grad=True)
    bb = torch.randn(40, 4, generator=g, requires_grad=True)
    y = lora_linear(x, q, None, a, bb, 2.0)
    ref = lora_linear_reference(x, q.get(), None, a, bb, 2.0)
    assert rel_err(y, ref) < 1e-6
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref.sum().backward()
    assert rel_err(gx, x.grad) < 1e-6


def test_frozen_weight_dispatch():
    lin = torch.nn.Linear(4, 3)
    assert frozen_weight(lin) is lin.weight
    assert frozen_weight(torch.nn.Conv1d(2, 2, 1)) is None
