"""Fused LoRA linear layer: y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ  (Hu et al. 2021, eq. 3; s = alpha / r).

Two autograd nodes instead of the six to nine that ``base(x) + B(A(dropout(x))) * s`` records:

* ``_LoraDelta``: z = (s · x Aᵀ) Bᵀ + b. Saves x and the (N, r) product u = s · x Aᵀ, nothing of size
  N × d_out; its backward gives the A and B gradients and x's share of the input gradient.
* ``_FrozenLinear``: y = x W0ᵀ + z in one GEMM accumulating into z in place (no copy of z). W0 is
  frozen and kept on ``ctx`` as a parameter reference, so this node saves no tensors at all. Its
  backward returns the whole input gradient g W0 + (s g B) A in one buffer (the LoRA share enters
  through the GEMM's accumulator) and hands s g B to the LoRA node, which then needs no second pass
  over g for it.

Because the second node saves nothing, non-reentrant activation checkpointing (which stops its
recomputation once the last saved tensor is rebuilt) skips the base GEMM of the last projection of
a checkpointed block (the MLP's down projection), 27% of a Llama layer's recomputed GEMM FLOPs.

Only the no-dropout path is fused (dropout p = 0 is what LoRA recipes use on large models); with
dropout, or with a trainable bias, ``lora_linear`` computes the reference.

Under torch.compile the layer takes a traceable form (``_LoraLinearTraceable``): one node whose two
large products are opaque operators accumulating in place, and whose recomputation the compiler's
partitioner trims inside a checkpointed block (kernels/compile.py).

For decoding, ``lora_linear_frozen`` takes s·A and B already in the compute dtype (a copy made once
per rollout, see ``LoraLinear.freeze_adapter``): no casts and no autograd node per step, three
products per projection.

The frozen weight may also be a 4-bit bitsandbytes weight (QLoRA): ``frozen_weight(base)`` returns a
``Dequantized`` handle that the base node dequantizes to bf16 in forward and again in backward,
as bitsandbytes' own matmul does, so the 4-bit base gets the same fusion and recompute saving.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ops import define


class Dequantized:
    """A frozen quantized weight: ``get()`` returns it dequantized (a fresh temporary)."""

    requires_grad = False

    def __init__(self, param, dequantize: Callable, dtype: torch.dtype):
        self.param, self.dequantize, self.dtype = param, dequantize, dtype

    def get(self) -> torch.Tensor:
        return self.dequantize(self.param.data, self.param.quant_state)


def _bnb_4bit(module) -> Dequantized | None:
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return None
    from bitsandbytes.functional import dequantize_4bit
    return Dequantized(module.weight, dequantize_4bit, state.dtype)


_GETTERS: dict[type, Callable | None] = {nn.Linear: lambda m: m.weight}


def _detect(cls: type) -> Callable | None:
    """The getter for a layer class not in ``_GETTERS``: bitsandbytes' 4-bit layer, else none."""
    return _bnb_4bit if cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes") else None


def frozen_weight(base: nn.Module):
    """The weight handle the fused op takes for ``base`` (a tensor, a ``Dequantized``), or None when
    the base layer has no fused path. Reads only: called inside compiled, checkpointed blocks, where
    a side effect (filling a cache) would break the graph."""
    cls = type(base)
    getter = _GETTERS[cls] if cls in _GETTERS else _detect(cls)
    return None if getter is None else getter(base)


def lora_linear_reference(x: torch.Tensor, weight, bias: torch.Tensor | None,
                          a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Plain PyTorch: F.linear(x, W0, b) + F.linear(F.linear(x, A), B) · s, in the input's dtype."""
    if isinstance(weight, Dequantized):
        weight = weight.get()
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y + F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype) * scaling


class _Link:
    """What the two nodes of one fused layer share: the compute-dtype A and B, and in backward the
    (N, r) product s·g B, which the base node computes once for both (see ``_FrozenLinear.backward``)."""

    __slots__ = ("a", "b", "scaling", "gu")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float):
        self.a, self.b, self.scaling, self.gu = a, b, scaling, None


class _LoraDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, a, b, bias, link: _Link):
        """z = (s · x Aᵀ) Bᵀ (+ bias), saving x, the (N, r) product and A, B for backward.
        x2 (N, d_in); a (r, d_in); b (d_out, r); bias (d_out,) or None; all one dtype."""
        ctx.link = link
        u = torch.mm(x2, a.t()) * link.scaling                                   # (N, r)
        z = torch.mm(u, b.t()) if bias is None else torch.addmm(bias, u, b.t())  # (N, d_out)
        ctx.save_for_backward(x2, u, a, b)
        return z

    @staticmethod
    def backward(ctx, g):
        x2, u, a, b = ctx.saved_tensors
        link = ctx.link
        gu, link.gu = link.gu, None                                   # from the base node, if it ran
        gx = None
        if gu is None:
            g = g.contiguous()                                        # (N, d_out)
            gu = torch.mm(g, b).mul_(link.scaling)                    # (N, r) = s · g B
            gx = torch.mm(gu, a) if ctx.needs_input_grad[0] else None  # (N, d_in)
        ga = torch.mm(gu.t(), x2) if ctx.needs_input_grad[1] else None  # (r, d_in)
        gb = torch.mm(g.t(), u) if ctx.needs_input_grad[2] else None    # (d_out, r)
        return gx, ga, gb, None, None


def _materialize(weight, dtype: torch.dtype) -> torch.Tensor:
    w = weight.get() if isinstance(weight, Dequantized) else weight
    return w.to(dtype)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, z, link: _Link):
        ctx.weight, ctx.link = weight, link  # frozen: referenced (or its 4-bit handle), not saved
        ctx.mark_dirty(z)
        return z.addmm_(x2, _materialize(weight, x2.dtype).t())      # (N, d_out), z accumulated in place

    @staticmethod
    def backward(ctx, g):
        gx = None
        if ctx.needs_input_grad[0]:  # the whole input gradient, g W0 + (s g B) A, in one buffer
            link = ctx.link
            g = g.contiguous()                                        # (N, d_out)
            link.gu = torch.mm(g, link.b).mul_(link.scaling)          # (N, r)
            gx = torch.mm(link.gu, link.a)                            # (N, d_in)
            gx.addmm_(g, _materialize(ctx.weight, g.dtype))           # += g W0 (GEMM epilogue accumulates)
        return gx, None, g, None


# -- the form torch.compile traces ---------------------------------------------------------------
# Inside a compiled graph there is no shared link and no in-place update of an autograd input; the
# layer is one autograd function whose two large products are opaque operators. Each allocates its
# output once and accumulates the second product into it in place, where the compiler, given
# ``addmm(z, x, W)``, would first copy z into a fresh buffer (one (N, d_out) copy per layer and step).

def _lora_output(x2, w, u, b, bias):
    """x W0ᵀ + u Bᵀ (+ bias): x2 (N, d_in), w (d_out, d_in), u (N, r), b (d_out, r) -> (N, d_out)."""
    y = torch.mm(u, b.t()) if bias is None else torch.addmm(bias, u, b.t())
    return y.addmm_(x2, w.t())


def _lora_input_grad(g, w, gu, a):
    """g W0 + gu A: g (N, d_out), w (d_out, d_in), gu (N, r), a (r, d_in) -> (N, d_in)."""
    return _lora_input_grad_sum((g,), (w,), gu, a)


def _lora_input_grad_sum(gs, ws, gu, a):
    """Σᵢ (gᵢ W0ᵢ + guᵢ Aᵢ) of projections that read one input (q, k and v; gate and up): gu is the
    guᵢ side by side (N, Σr) and a the Aᵢ stacked (Σr, d_in), so one product writes the buffer that
    every base product then accumulates into. Separately, each projection would write its own
    (N, d_in) gradient and a later kernel would read them all back to sum them."""
    out = torch.mm(gu, a)
    for g, w in zip(gs, ws):
        out.addmm_(g, w)
    return out


lora_output = define("lora_output(Tensor x2, Tensor w, Tensor u, Tensor b, Tensor? bias) -> Tensor", _lora_output,
                     lambda x2, w, u, b, bias: x2.new_empty((x2.shape[0], w.shape[0])))
lora_input_grad = define("lora_input_grad(Tensor g, Tensor w, Tensor gu, Tensor a) -> Tensor", _lora_input_grad,
                         lambda g, w, gu, a: g.new_empty((g.shape[0], w.shape[1])))
lora_input_grad_sum = define("lora_input_grad_sum(Tensor[] g, Tensor[] w, Tensor gu, Tensor a) -> Tensor",
                             _lora_input_grad_sum, lambda gs, ws, gu, a: gu.new_empty((gu.shape[0], a.shape[1])))


class _LoraLinearTraceable(torch.autograd.Function):
    """The fused layer as one node for torch.compile, with the scale already in A (the caller passes
    s · A, in the compute dtype: the multiply fuses into that cast, and no (N, r) product is scaled in
    forward or backward). Saves x and u = x (s A)ᵀ; W0 (or its 4-bit handle) is referenced on ``ctx``.
    In a checkpointed compiled block the compiler's partitioner recomputes only what backward reads,
    so the last projection's product is skipped there too."""

    @staticmethod
    def forward(ctx, x2, a, b, bias, weight):
        ctx.weight = weight
        u = torch.mm(x2, a.t())                                               # (N, r)
        ctx.save_for_backward(x2, u, a, b)
        return lora_output(x2, _materialize(weight, x2.dtype), u, b, bias)   # (N, d_out)

    @staticmethod
    def backward(ctx, g):
        x2, u, a, b = ctx.saved_tensors
        gu = torch.mm(g, b)                                                   # (N, r)
        ga = torch.mm(gu.t(), x2) if ctx.needs_input_grad[1] else None
        gb = torch.mm(g.t(), u) if ctx.needs_input_grad[2] else None
        gx = lora_input_grad(g, _materialize(ctx.weight, g.dtype), gu, a) if ctx.needs_input_grad[0] else None
        return gx, ga, gb, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a linear layer in (x's dtype outside autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fusable(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> bool:
    """The fused path needs a frozen float (or dequantizable) weight and no trainable bias."""
    return (weight.dtype.is_floating_point and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and x.dtype.is_floating_point)


def lora_linear(x: torch.Tensor, weight, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Fused y = x W0ᵀ + b + s (x Aᵀ) Bᵀ for x (..., d_in); W0 frozen. Gradients flow to x, A and B.

    Computes in autocast's dtype when autocast is on (A and B are cast, their gradients come back in
    their own dtype), else in x's dtype. Falls back to the reference when ``fusable`` says no.
    """
    if not fusable(weight, bias, x):
        return lora_linear_reference(x, weight, bias, a, b, scaling)
    dt = compute_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dt)                            # (N, d_in)
    w = weight if isinstance(weight, Dequantized) else weight.to(dt)
    bb = None if bias is None else bias.to(dt)
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():  # no Python side effects inside a compiled graph
            y = _LoraLinearTraceable.apply(x2, (a * scaling).to(dt), b.to(dt), bb, w)
        else:
            a, b = a.to(dt), b.to(dt)
            link = _Link(a, b, float(scaling))
            z = _LoraDelta.apply(x2, a, b, bb, link)
            y = _FrozenLinear.apply(x2, w, z, link)
    return y.view(*lead, y.shape[-1])                                 # (..., d_out)


def lora_linear_frozen(x: torch.Tensor, weight, bias: torch.Tensor | None,
                       a_scaled: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inference-only y = x W0ᵀ + b + (x (sA)ᵀ) Bᵀ, with s·A (r, d_in) and B (d_out, r) given in the
    compute dtype; x (..., d_in) is cast to it. No gradients flow."""
    dt = a_scaled.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dt)                            # (N, d_in)
    with torch.autocast(x.device.type, enabled=False):
        u = torch.mm(x2, a_scaled.t())                                # (N, r)
        y = lora_output(x2, _materialize(weight, dt), u, b, None if bias is None else bias.to(dt))
    return y.view(*x.shape[:-1], y.shape[-1])
