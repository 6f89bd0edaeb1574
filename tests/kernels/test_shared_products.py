"""Small products that read one large operand are merged into one product (kernels/compile.py,
``shared_operand_products``): LoRA's x Aᵀ for q, k and v (and gate and up) read the normed input
once, and so do their A gradients guᵀ x in backward."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.profiler import ProfilerActivity, profile

from helpers import ids
from test_checkpointing import _grads, _lora_model
from tunesmith.kernels import compile as C
from tunesmith.train import accel

MM = torch.ops.aten.mm.default


def _mms(gm) -> int:
    return sum(n.target is MM for n in gm.graph.nodes)


def _products(x, a1, a2, a3, w, g1, g2):
    x2 = x.view(-1, x.shape[-1])
    u1 = torch.mm(x2, a1.t())
    u2 = torch.mm(x.view(-1, x.shape[-1]), a2.t())     # another view of the same tensor
    u3 = torch.mm(x2, a3.t()) * 2
    wide = torch.mm(x2, w.t())                          # wider than GROUP_MAX: left alone
    ga1 = torch.mm(g1.t(), x2)                          # (r, d): the gradient form
    ga2 = torch.mm(g2.t(), x2)
    return u1, u2, u3, wide, ga1, ga2


def test_products_sharing_an_operand_become_one_with_the_same_values():
    torch.manual_seed(0)
    d, n = 96, 24
    args = (torch.randn(2, 12, d), torch.randn(4, d), torch.randn(8, d), torch.randn(4, d),
            torch.randn(C.GROUP_MAX + 1, d), torch.randn(n, 4), torch.randn(n, 8))
    gm = make_fx(_products, tracing_mode="fake")(*args)
    assert _mms(gm) == 6
    assert C.shared_operand_products(gm.graph) == 3      # 3 x Aᵀ -> 1, 2 guᵀ x -> 1
    gm.recompile()
    assert _mms(gm) == 3
    for got, want in zip(gm(*args), _products(*args)):
        torch.testing.assert_close(got, want)


def test_a_product_that_reads_another_is_not_merged_with_it():
    def chained(x, a1, a2):
        u1 = torch.mm(x, a1.t())
        return torch.mm(x, (a2 * u1.sum()).t())           # needs u1 first
    args = (torch.randn(24, 96), torch.randn(4, 96), torch.randn(4, 96))
    gm = make_fx(chained, tracing_mode="fake")(*args)
    assert C.shared_operand_products(gm.graph) == 0
    gm.recompile()
    torch.testing.assert_close(gm(*args), chained(*args))


def _mm_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")


@pytest.mark.slow
def test_compiled_lora_block_reads_its_shared_inputs_once():
    """A Llama block with LoRA on its 7 projections: q, k, v share one input, gate and up another.
    Eager, forward runs 14 products a block (x Aᵀ and u Bᵀ for each projection); compiled, 11 (the
    three x Aᵀ of q, k, v in one, those of gate and up in one). Backward runs 28 a block eager (g B,
    guᵀ x, gᵀ u, gu A) and 22 compiled (the guᵀ x merged as the x Aᵀ are, and the gu A of q, k, v in
    one, those of gate and up in one); the checkpointed block's recomputation runs 14 eager and 6
    compiled (the u Bᵀ less the down projection's, which backward does not read; the x Aᵀ are kept).
    Gradients are eager's."""
    batch = ids(2, 24)
    eager = _lora_model(layers=2)
    accel.enable_checkpointing(eager, layers=1)          # block 0 keeps its products, block 1 recomputes
    ref = _grads(eager, batch)
    out = {}
    eager_fwd = _mm_calls(lambda: out.update(loss=eager(input_ids=batch, labels=batch).loss))
    eager_bwd = _mm_calls(lambda: out["loss"].backward())

    model = _lora_model(layers=2)
    accel.enable_checkpointing(model, layers=1)
    C.compile_decoder_layers(model)
    _grads(model, batch)                                   # compiles
    fwd = _mm_calls(lambda: out.update(loss=model(input_ids=batch, labels=batch).loss))
    model.zero_grad(set_to_none=True)
    bwd = _mm_calls(lambda: out["loss"].backward())
    assert eager_fwd - fwd == 3 * 2
    # merged A gradients (3 a block); the checkpointed block recomputes 6 products, not 14: its x Aᵀ
    # are kept (``_narrow``), the down projection's u Bᵀ is not read; input gradients summed in one
    # buffer (``summed_input_gradients``): gate and up in both blocks, q, k and v in block 1 (block 0's
    # input needs no gradient)
    assert eager_bwd - bwd == 3 * 2 + (14 - 6) + (1 + 3)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)

    # another length: the blocks recompile with a symbolic token count, and still merge
    other = ids(2, 17)
    eager_fwd = _mm_calls(lambda: eager(input_ids=other, labels=other))
    _grads(model, other)                                   # recompiles, dynamic
    assert eager_fwd - _mm_calls(lambda: model(input_ids=other, labels=other)) == 3 * 2


LIG = torch.ops.tunesmith.lora_input_grad.default
SUM = torch.ops.tunesmith.lora_input_grad_sum.default


def _three_projections(x, g1, g2, g3, w1, w2, w3, gu1, gu2, gu3, a1, a2, a3, other):
    """The input gradient of x read by three projections (q, k, v) and by one more operation (other),
    summed the way autograd sums it: views of each projection's (N, d) gradient, added pairwise."""
    parts = [LIG(g, w, gu, a).view(x.shape) for g, w, gu, a in ((g1, w1, gu1, a1), (g2, w2, gu2, a2), (g3, w3, gu3, a3))]
    return (parts[0] + other) + (parts[1] + parts[2])


def test_input_gradients_of_projections_sharing_an_input_are_summed_in_one_buffer():
    torch.manual_seed(0)
    n, d, r = 12, 16, 4
    g = [torch.randn(n, k) for k in (16, 8, 8)]
    w = [torch.randn(k, d) for k in (16, 8, 8)]
    gu = [torch.randn(n, r) for _ in range(3)]
    a = [torch.randn(r, d) for _ in range(3)]
    args = (torch.randn(2, 6, d), *g, *w, *gu, *a, torch.randn(2, 6, d))
    gm = make_fx(_three_projections, tracing_mode="fake")(*args)
    assert C.summed_input_gradients(gm.graph) == 2
    gm.recompile()
    targets = [node.target for node in gm.graph.nodes]
    assert targets.count(SUM) == 1 and LIG not in targets
    assert targets.count(torch.ops.aten.add.Tensor) == 1                  # the other term, added once
    torch.testing.assert_close(gm(*args), _three_projections(*args))


def test_input_gradients_with_computed_weights_are_left_apart():
    """A weight computed in the graph (a dequantized 4-bit one) is not merged: every projection's
    would be alive at once."""
    def computed(x, g1, g2, w1, w2, gu1, gu2, a1, a2):
        return LIG(g1, w1 * 2, gu1, a1) + LIG(g2, w2 * 2, gu2, a2)
    args = (None, torch.randn(12, 16), torch.randn(12, 8), torch.randn(16, 16), torch.randn(8, 16),
            torch.randn(12, 4), torch.randn(12, 4), torch.randn(4, 16), torch.randn(4, 16))
    gm = make_fx(computed, tracing_mode="fake")(*args)
    assert C.summed_input_gradients(gm.graph) == 0
