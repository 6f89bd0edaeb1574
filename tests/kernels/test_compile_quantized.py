"""Compiled blocks over a quantized base: the graph must not keep the dequantized weights for backward
(kernels/compile.py). A stand-in 4-bit layer dequantizes through an opaque custom op, as bitsandbytes
does; the compiled block's saved tensors hold no weight-sized tensor, and its gradients are the
eager block's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tunesmith
from helpers import ids, rel_err, tiny
from tunesmith.kernels import compile as C
from tunesmith.kernels import lora as K
from tunesmith.models.targets import find_blocks

pytestmark = pytest.mark.slow  # compiles with torch.compile: minutes on a 2-core machine


@torch.library.custom_op("tunesmith_test::dequantize", mutates_args=())
def _dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return packed.to(torch.float32) * scale


@_dequantize.register_fake
def _(packed, scale):
    return torch.empty(packed.shape, dtype=torch.float32, device=packed.device)


class Fake4bit(nn.Linear):
    """int8 codes with a per-row scale; forward dequantizes like a 4-bit layer (a Linear subclass, as
    bitsandbytes' Linear4bit is)."""

    def __init__(self, lin: nn.Linear):
        super().__init__(lin.in_features, lin.out_features, bias=False, device="meta")
        scale = lin.weight.detach().abs().amax(1, keepdim=True) / 7
        codes = torch.round(lin.weight.detach() / scale).to(torch.int8)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight.quant_state = scale

    def forward(self, x):
        return x @ _dequantize(self.weight, self.weight.quant_state).t()


def _model(monkeypatch):
    detect = K._detect  # found by class at each call, as bitsandbytes' Linear4bit is
    monkeypatch.setattr(K, "_detect", lambda cls: (lambda m: K.Dequantized(m.weight, _dequantize, torch.float32))
                        if cls is Fake4bit else detect(cls))
    monkeypatch.setattr(C, "DEQUANT_NAMESPACES", {"tunesmith_test"})
    model = tiny(num_hidden_layers=2)
    for block in find_blocks(model)[1]:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Fake4bit(child))
    model = tunesmith.apply(model, "lora", r=4, target_modules="all-linear")
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    return model.train()


def _step(model, batch):
    """Saved tensors as (shape, dtype, bytes), parameters left out (they cost no memory), and grads."""
    saved, params = [], {p.data_ptr() for p in model.parameters()}

    def pack(t):
        if t.data_ptr() not in params:
            saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _shapes(saved) -> set[tuple]:
    return {(shape, dtype) for shape, dtype, _ in saved}


def _bytes(saved) -> int:
    return sum(n for *_, n in saved)


def _weights(model) -> set[tuple]:
    """(shape, dtype) of the dequantized weights."""
    return {(tuple(m.weight.shape), torch.float32) for m in model.modules() if isinstance(m, Fake4bit)}


def test_compiled_quantized_blocks_recompute_the_dequantized_weights(monkeypatch):
    batch = ids(3, 16)  # 48 tokens: no activation shares a weight's shape
    _, eager = _step(_model(monkeypatch), batch)

    plain = _model(monkeypatch)   # compiled without the policy: the compiler keeps the weights
    with monkeypatch.context() as m:
        m.setattr(C, "_checkpoint_inside", lambda layer, checkpointed: None)
        C.compile_decoder_layers(plain)
    saved_plain, ref = _step(plain, batch)
    assert _weights(plain) & _shapes(saved_plain)

    model = _model(monkeypatch)
    assert C.compile_decoder_layers(model) == 2
    saved, got = _step(model, batch)
    assert saved and not _weights(model) & _shapes(saved), _weights(model) & _shapes(saved)
    weight_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Fake4bit))
    assert _bytes(saved) <= _bytes(saved_plain) - weight_bytes     # and keeps no more of anything else
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)   # the same graph's math
        assert rel_err(got[n], eager[n]) < 1e-3, n                                # and the eager block's


def test_checkpointed_quantized_blocks_compile_whole(monkeypatch):
    """Every block checkpointed inside its compiled graph: one graph per block (finding the 4-bit
    weight's handle must not write anything while traced), and the eager checkpointed gradients."""
    import torch._dynamo.utils as dynamo_utils
    from tunesmith.train import accel
    batch = ids(3, 16)
    eager = _model(monkeypatch)
    accel.enable_checkpointing(eager)
    _, ref = _step(eager, batch)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    monkeypatch.delitem(K._GETTERS, Fake4bit, raising=False)  # nothing cached from the eager run
    model = _model(monkeypatch)
    accel.enable_checkpointing(model)
    C.compile_decoder_layers(model)
    _step(model, batch)
    saved, got = _step(model, batch)
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    assert not _weights(model) & _shapes(saved)
    for n in ref:
        assert rel_err(got[n], ref[n]) < 1e-3, n  # bf16 rounding: torch 2.11's CPU code gives 1.2e-4
