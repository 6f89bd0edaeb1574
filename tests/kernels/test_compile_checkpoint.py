"""Checkpointed blocks under torch.compile (kernels/compile.py): the checkpoint runs inside the compiled
graph, so backward recomputes only what it reads. Each LoRA projection's output product is the opaque
``tunesmith::lora_output`` operator; counted with the profiler, a checkpointed block runs all 7 in
forward and 6 in backward (the down projection's output feeds nothing in backward), the block keeps
only its inputs, and the gradients are those of the eager checkpointed model."""
from __future__ import annotations

import operator

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from helpers import ids
from test_checkpointing import _grads, _lora_model
from tunesmith.kernels import compile as C
from tunesmith.models.targets import find_blocks
from tunesmith.train import accel

pytestmark = pytest.mark.slow  # compiles with torch.compile: minutes on a 2-core machine

OP = "tunesmith::lora_output"


def _op_calls(fn, op: str = OP) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == op)


def _saved_shapes(model, batch) -> list[tuple]:
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    return saved, loss


def test_compiled_checkpointed_blocks_recompute_only_what_backward_reads():
    batch = ids(2, 24)
    eager = _lora_model(layers=2)
    accel.enable_checkpointing(eager)
    ref = _grads(eager, batch)

    model = _lora_model(layers=2)
    accel.enable_checkpointing(model)
    assert C.compile_decoder_layers(model) == 2
    assert not any(b.gradient_checkpointing for b in find_blocks(model)[1])  # not wrapped a second time
    _grads(model, batch)                                                     # compiles
    model.zero_grad(set_to_none=True)

    out = {}
    assert _op_calls(lambda: out.update(loss=model(input_ids=batch, labels=batch).loss)) == 7 * 2
    assert _op_calls(lambda: out["loss"].backward()) == 6 * 2
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)

    cfg = model.config
    saved, _ = _saved_shapes(model, batch)
    rows = [s for s in saved if len(s) >= 2 and s[0] * (s[1] if len(s) == 3 else 1) == batch.numel()]
    # a block keeps its input and its 7 narrow x·Aᵀ (recomputing them would read their inputs again),
    # no MLP activation, no attention product
    widths = [s[-1] for s in rows]
    assert cfg.intermediate_size not in widths, widths
    assert widths.count(4) == 7 * 2, widths
    assert set(widths) <= {cfg.hidden_size, 4, 1, cfg.vocab_size}, widths   # the rest: the final norm and loss


def test_blocks_left_unchecked_keep_their_activations_under_compile():
    batch = ids(2, 24)
    model = _lora_model(layers=2)
    accel.enable_checkpointing(model, layers=1)                             # block 1 checkpointed, 0 not
    C.compile_decoder_layers(model)
    _grads(model, batch)
    model.zero_grad(set_to_none=True)
    out = {}
    assert _op_calls(lambda: out.update(loss=model(input_ids=batch, labels=batch).loss)) == 7 * 2
    assert _op_calls(lambda: out["loss"].backward()) == 6  # only the checkpointed block: block 0 keeps its products


@pytest.mark.parametrize("method,kw", [("dora", {}), ("lora", {"dropout": 0.3})])
def test_other_layers_compile_whole_and_match_eager_under_inner_checkpointing(method, kw):
    """One graph per block, no break (a cache filled inside the checkpoint would break it), and the
    gradients of eager checkpointing; with dropout the recomputation replays the forward's masks
    (inductor draws with torch's generator here, so eager and compiled draw the same)."""
    import torch._dynamo.utils as dynamo_utils
    batch = ids(2, 24)

    def build():
        return _lora_model(layers=2, method=method, options=kw)

    def grads(model):
        torch.manual_seed(5)
        return _grads(model, batch)
    eager = build()
    accel.enable_checkpointing(eager)
    ref = grads(eager)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    model = build()
    accel.enable_checkpointing(model)
    C.compile_decoder_layers(model)
    with torch._inductor.config.patch(fallback_random=True):
        grads(model)
        got = grads(model)
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_blocks_that_keep_activations_keep_only_products_under_compile():
    """A compiled block that is not checkpointed runs under the policy: it keeps the products (no
    recomputation in backward) and no more than the compiler alone keeps, with the same gradients.
    (On CUDA the compiler alone also keeps fp32 norm intermediates: 1B full fine-tuning measured
    18.4 GiB without the policy and 15.4 GiB with it; the CPU compiler already recomputes them.)"""
    batch = ids(2, 24)
    ref = _grads(_lora_model(layers=2, method="full"), batch)

    plain = _lora_model(layers=2, method="full")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(C, "_checkpoint_inside", lambda layer, checkpointed: None)
        C.compile_decoder_layers(plain)
    _grads(plain, batch)
    saved_plain, _ = _saved_shapes(plain, batch)

    model = _lora_model(layers=2, method="full")
    C.compile_decoder_layers(model)
    _grads(model, batch)
    saved, _ = _saved_shapes(model, batch)
    got = _grads(model, batch)
    numel = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    assert numel(saved) <= numel(saved_plain)
    assert (2 * 24, model.config.intermediate_size) in saved                # the MLP products are kept
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_dora_row_norms_are_kept_not_recomputed_in_checkpointed_blocks():
    """DoRA's row norms read the whole frozen weight; a checkpointed compiled block keeps the (d_out,)
    result, so backward does not compute them again."""
    batch = ids(2, 24)
    model = _lora_model(layers=2, method="dora")
    accel.enable_checkpointing(model)
    C.compile_decoder_layers(model)
    _grads(model, batch)
    model.zero_grad(set_to_none=True)
    out = {}
    kept_calls = lambda fn: _op_calls(fn, "tunesmith::kept")  # noqa: E731  (each norm passes it once,
    # and so does the output of each block's last projection, see the test below)
    assert kept_calls(lambda: out.update(loss=model(input_ids=batch, labels=batch).loss)) == (7 + 1) * 2
    assert kept_calls(lambda: out["loss"].backward()) == 0


def test_dora_keeps_the_last_projections_output_instead_of_recomputing_it():
    """DoRA's magnitude gradient reads each projection's linear output. In a checkpointed compiled
    block the last projection (the down projection) keeps it, so backward recomputes 6 products, as
    for LoRA, not 7; the gradients stay those of eager checkpointing."""
    batch = ids(2, 24)
    eager = _lora_model(layers=2, method="dora")
    accel.enable_checkpointing(eager)
    ref = _grads(eager, batch)

    model = _lora_model(layers=2, method="dora")
    accel.enable_checkpointing(model)
    C.compile_decoder_layers(model)
    assert [n for n, m in model.named_modules() if getattr(m, "keep_output", False)] == [
        f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    _grads(model, batch)
    model.zero_grad(set_to_none=True)
    out = {}
    assert _op_calls(lambda: out.update(loss=model(input_ids=batch, labels=batch).loss)) == 7 * 2
    assert _op_calls(lambda: out["loss"].backward()) == 6 * 2
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


class _Recorded:
    """Stand-in for ActivationOffload's compiled-block path on the CPU: what a compiled block saves
    for backward passes through the hooks (a copy in the tensor's own layout, as the host round trip),
    parameters excepted."""

    def __init__(self, model):
        self.frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.shapes: list[list[tuple]] = []

    def block(self, call):
        def pack(t):
            if t.untyped_storage().data_ptr() in self.frozen:
                return t
            self.shapes[-1].append(tuple(t.shape))
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)

        def run(*args, **kwargs):
            self.shapes.append([])
            hooks = torch.autograd.graph.saved_tensors_hooks(torch.compiler.disable(pack), lambda t: t)
            with hooks:
                return call(*args, **kwargs)
        return run


def test_offload_wraps_each_compiled_block_and_sees_what_it_keeps():
    """train.offload_activations with train.compile: the offload's hooks run around each compiled
    block (never inside its graph), see the products of the block that is not checkpointed and only
    the input of the one that is, and change no gradient."""
    batch = ids(2, 24)
    ref_model = _lora_model(layers=2)
    accel.enable_checkpointing(ref_model, layers=1)
    C.compile_decoder_layers(ref_model)
    ref = _grads(ref_model, batch)

    model = _lora_model(layers=2)
    accel.enable_checkpointing(model, layers=1)                             # block 1 checkpointed, 0 not
    rec = _Recorded(model)
    for block in find_blocks(model)[1]:
        block.activation_offload = rec
    C.compile_decoder_layers(model)
    _grads(model, batch)                                                     # compiles
    rec.shapes.clear()
    got = _grads(model, batch)
    kept, checkpointed = rec.shapes
    widths = lambda shapes: {s[-1] for s in shapes if len(s) >= 2}  # noqa: E731
    assert model.config.intermediate_size in widths(kept)                   # block 0 keeps its MLP products
    assert model.config.intermediate_size not in widths(checkpointed)       # block 1 only its input
    assert (2, 24, model.config.hidden_size) in checkpointed
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_attention_without_dropout_is_recomputed_without_saving_the_generator_state():
    """A checkpointed block recomputes its attention in backward. Called with dropout 0 it draws no
    random numbers, so the compiled graphs call the untagged alias in forward and in recomputation,
    not the tagged operator that the compiler wraps in generator-state saving (which also stops
    inductor's C++ wrapper), and give eager's gradients. (Calls with dropout keep their operator:
    ``test_seedless_attention_drops_size_outputs_as_the_constants_they_are``.)"""
    batch = ids(2, 24)

    def build():
        model = _lora_model(layers=2)
        assert model.config._attn_implementation == "sdpa"
        accel.enable_checkpointing(model)
        return model
    ref = _grads(build(), batch)
    model = build()
    C.compile_decoder_layers(model)
    _grads(model, batch)                                                     # compiles
    model.zero_grad(set_to_none=True)
    alias = "tunesmith::seedless_scaled_dot_product_flash_attention_for_cpu"
    out = {}
    assert _op_calls(lambda: out.update(loss=model(input_ids=batch, labels=batch).loss), alias) == 2
    assert _op_calls(lambda: out["loss"].backward(), alias) == 2           # recomputed, one a block
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_seedless_attention_drops_size_outputs_as_the_constants_they_are(monkeypatch):
    """Flash and cuDNN attention (CUDA) also return sizes; the alias returns only tensors, and each
    size a graph read becomes its traced value. Written with a stand-in operator of that shape."""
    from tunesmith.kernels.ops import alias
    lib = torch.library.Library("tunesmith_test", "DEF")
    lib.define("noisy(Tensor x, float dropout_p, bool twice) -> (Tensor out, SymInt n, Tensor lse)",
               tags=(torch.Tag.nondeterministic_seeded,))

    def noisy(x, dropout_p, twice):
        return x * (2 if twice else 1), x.shape[0], x.sum(-1)
    lib.impl("noisy", noisy, "CompositeExplicitAutograd")
    torch.library.register_fake("tunesmith_test::noisy", noisy, lib=lib)
    op = torch.ops.tunesmith_test.noisy.default
    monkeypatch.setitem(C.SEEDLESS, op, alias("seedless_test_noisy", op))

    x = torch.randn(3, 4)
    g = torch.fx.Graph()
    inp = g.placeholder("x")
    results = []
    for dropout_p in (0.0, 0.5):             # the call with dropout keeps its operator
        call = g.call_function(op, (inp, dropout_p, True))
        call.meta["val"] = op(x, dropout_p, True)
        out, n, lse = (g.call_function(operator.getitem, (call, i)) for i in range(3))
        scaled = g.call_function(torch.ops.aten.mul.Tensor, (out, n))
        results.append(g.call_function(torch.ops.aten.add.Tensor, (scaled, g.call_function(
            torch.ops.aten.unsqueeze.default, (lse, 1)))))
    g.output(tuple(results))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    want = gm(x)
    assert C.seedless_attention(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.tunesmith.seedless_test_noisy.default in targets and op in targets
    assert torch.Tag.nondeterministic_seeded not in torch.ops.tunesmith.seedless_test_noisy.default.tags
    muls = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert muls[0].args[1] == 3 and isinstance(muls[1].args[1], torch.fx.Node)  # the size became its value
    for got, ref in zip(gm(x), want):
        torch.testing.assert_close(got, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_attention_recomputed_without_generator_state():
    """On CUDA in bf16 attention runs as flash or cuDNN attention, which also return sizes; the
    checkpointed blocks call the alias, keep no generator state and give eager's gradients (bf16
    tolerance)."""
    from torch._inductor.utils import run_and_get_code
    batch = ids(2, 256).cuda()

    def build():
        model = _lora_model(layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                            num_key_value_heads=2).cuda()
        accel.enable_checkpointing(model)
        return model

    def grads(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _grads(model, batch)
    ref = grads(build())
    model = build()
    C.compile_decoder_layers(model)
    with torch._inductor.config.patch(force_disable_caches=True):
        _, code = run_and_get_code(grads, model)
    got = grads(model)
    code = "\n".join(code)
    assert "seedless_scaled_dot_product" in code and "rng_state" not in code
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=2e-2, atol=2e-3, msg=n)
