"""Projections that read one input as one matmul (infer/engine/shared_input.py): the same outputs
and gradients as separate layers, fewer matmuls when decoding (eagerly and in a compiled graph), no
extra memory, an unchanged state dict, and a clean undo."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from additive_helpers import VOCAB, small
from helpers import ids
from tunesmith.infer.engine import Engine
from tunesmith.infer.engine.adapters import MultiLoraLinear
from tunesmith.infer.engine.fast import StaticRunner
from tunesmith.infer.engine.shared_input import SharedInputLinear, refresh, share_inputs, unshare


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _matmuls(model, x) -> tuple[int, torch.Tensor]:
    with torch.no_grad(), _CountMatmuls() as c:
        logits = model(input_ids=x).logits
    return c.n, logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: biases on q, k and v
def test_grouped_decode_equals_separate_layers_with_fewer_matmuls(arch):
    model = small(arch)
    ref = copy.deepcopy(model)
    layers = model.config.num_hidden_layers
    assert share_inputs(model) == 2 * layers
    x = ids(2, 7, vocab=VOCAB, seed=3)
    (n_ref, want), (n, got) = _matmuls(ref, x), _matmuls(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert n_ref - n == 3 * layers      # q/k/v: 3 -> 1, gate/up: 2 -> 1, in every layer


def test_weights_are_views_of_one_buffer_and_the_state_dict_is_unchanged():
    model = small("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    share_inputs(model)
    attn = model.model.layers[0].self_attn
    buf = attn.q_proj.shared_weight
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert lin.weight.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert {n: p for n, p in model.named_parameters()} == params     # the same parameter objects


def test_in_place_updates_reach_the_group_and_training_gradients_are_the_layers_own():
    model, ref = small("llama"), small("llama")
    share_inputs(model)
    x = ids(2, 6, vocab=VOCAB, seed=4)
    for m in (model, ref):                          # an optimizer step, as between rollouts
        m(input_ids=x, labels=x).loss.backward()
        assert m.model.layers[0].self_attn.k_proj.weight.grad is not None
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    ga, gb = model.model.layers[1].mlp.up_proj.weight.grad, ref.model.layers[1].mlp.up_proj.weight.grad
    torch.testing.assert_close(ga, gb)
    torch.testing.assert_close(_matmuls(model, x)[1], _matmuls(ref, x)[1], rtol=1e-5, atol=1e-5)


def test_a_layer_called_on_another_input_computes_its_own_product():
    model = small("llama")
    share_inputs(model)
    attn = model.model.layers[0].self_attn
    a, b = torch.randn(3, attn.q_proj.in_features), torch.randn(3, attn.q_proj.in_features)
    with torch.no_grad():
        attn.q_proj(a)
        torch.testing.assert_close(attn.k_proj(b), F.linear(b, attn.k_proj.weight))
        torch.testing.assert_close(attn.v_proj(a), F.linear(a, attn.v_proj.weight))   # a: the group's product
        torch.testing.assert_close(attn.v_proj(b), F.linear(b, attn.v_proj.weight))   # nothing kept after the last


def test_unshare_gives_each_layer_its_own_storage():
    model = small("llama")
    share_inputs(model)
    mlp = model.model.layers[0].mlp
    unshare(mlp.up_proj)
    assert type(mlp.gate_proj) is torch.nn.Linear and type(mlp.up_proj) is torch.nn.Linear
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() != mlp.up_proj.weight.untyped_storage().data_ptr()
    assert "shared_weight" not in dict(mlp.gate_proj.named_buffers())
    assert isinstance(model.model.layers[1].mlp.up_proj, SharedInputLinear)   # other groups stay


def test_only_plain_linear_groups_of_one_dtype_are_made():
    model = small("llama")
    attn = model.model.layers[0].self_attn
    attn.k_proj.to(torch.float64)
    made = share_inputs(model)
    assert made == 2 * model.config.num_hidden_layers - 1
    assert type(attn.q_proj) is torch.nn.Linear


def test_a_saved_and_reloaded_model_has_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM
    model = small("llama")
    share_inputs(model)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_a_compiled_decode_graph_has_the_grouped_matmuls():
    """Under dynamo the group's input and product are kept only while the graph is traced: one graph,
    the grouped matmuls in it, and nothing left on the group afterwards."""
    model = small("llama")
    ref = copy.deepcopy(model)
    share_inputs(model)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward
    x = ids(1, 5, vocab=VOCAB, seed=6)
    with torch.no_grad():
        got = torch.compile(lambda t: model(input_ids=t).logits, backend=backend, fullgraph=True)(x)
        want = ref(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    linears = sum(1 for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is F.linear)
    layers = model.config.num_hidden_layers
    assert len(graphs) == 1 and linears == 4 * layers + 1      # qkv, o, gate/up, down; the head
    share = model.model.layers[0].self_attn.q_proj._share
    assert share.x is None and share.out is None


def _factors(model, names, r, seed):
    g = torch.Generator().manual_seed(seed)
    found = dict(model.named_modules())
    return {n: (torch.randn(r, found[n].in_features, generator=g), torch.randn(found[n].out_features, r, generator=g), 0.5)
            for n in names}


def test_a_group_holds_per_row_adapters_as_the_wrapped_layers_do():
    """Adapters on some layers of a group (k and not v; gate and up of one block only), rows on
    different adapters and on the base: the grouped model equals the per-layer wrappers, as
    adapters come and go."""
    from tunesmith.infer.engine.adapters import AdapterTable
    model = small("llama")
    ref = copy.deepcopy(model)
    share_inputs(model)
    tables = AdapterTable(model), AdapterTable(ref)
    a = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.gate_proj",
         "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    b = ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    fa, fb = _factors(ref, a, 3, seed=1), _factors(ref, b, 2, seed=2)
    for t in tables:
        t.add("a", fa)
        t.add("b", fb)
    assert isinstance(model.model.layers[0].self_attn.k_proj, SharedInputLinear)
    assert isinstance(ref.model.layers[0].self_attn.k_proj, MultiLoraLinear)
    assert len(tables[0].layers()) == 4    # o_proj's wrapper; block 0's q/k/v, block 1's q/k/v and gate/up
    x = ids(3, 5, vocab=VOCAB, seed=7)

    def logits(m, t, slots):
        with torch.no_grad(), t.bind(torch.tensor(slots)):
            return m(input_ids=x).logits
    for step in ("both", "b removed", "none"):
        for slots in ([0, 1, -1], [1, 1, 0]):
            torch.testing.assert_close(logits(model, tables[0], slots), logits(ref, tables[1], slots),
                                       rtol=1e-5, atol=1e-5)
        if step == "both":
            assert not torch.allclose(logits(model, tables[0], [0, 1, -1])[0], logits(model, tables[0], [-1, 1, -1])[0])
            for t in tables:
                t.remove("b")
        elif step == "b removed":
            for t in tables:
                t.remove("a")
    share = model.model.layers[0].self_attn.q_proj._share
    assert share.B is None and share.W.shape == (sum(m.out_features for m in share.layers), model.config.hidden_size)
    assert not tables[0].layers()


def test_the_fast_path_groups_and_its_adapters_join_the_groups(tokenizer):
    model = small("llama")
    engine = Engine(model, tokenizer, fast=True, max_batch=2)
    assert isinstance(engine.routes["base"].lane.runner, StaticRunner)
    engine.routes["base"].lane.runner.table.add("a", _factors(model, ["model.layers.0.self_attn.k_proj"], 2, seed=3))
    attn = model.model.layers[0].self_attn
    share = attn.q_proj._share
    rows = sum(m.out_features for m in share.layers)
    assert isinstance(attn.k_proj, SharedInputLinear)
    assert share.B.shape == (rows, 2) and share.W.shape == (rows + 2, attn.q_proj.in_features)


def test_a_moved_or_cast_model_is_laid_out_again():
    """``model.to(...)`` gives every parameter its own storage; refresh finds the broken groups and
    lays them out again from the layers' weights, so later in-place updates reach the group."""
    model = small("qwen2")
    ref = copy.deepcopy(model)
    share_inputs(model)
    assert refresh(model) == 0
    model.double(), ref.double()
    assert refresh(model) == 2 * model.config.num_hidden_layers
    assert refresh(model) == 0
    with torch.no_grad():
        for m in (model, ref):
            m.model.layers[0].self_attn.k_proj.weight.add_(0.5)
            m.model.layers[0].self_attn.k_proj.bias.add_(0.5)
    x = ids(2, 6, vocab=VOCAB, seed=5)
    torch.testing.assert_close(_matmuls(model, x)[1], _matmuls(ref, x)[1])
