"""Several adapters on one base: rows of a mixed batch get the same greedy tokens (fp32, CPU) as each
adapter's own model; adapters load and unload at run time; what cannot share the base gets a lane
of its own, with the reason."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tunesmith
from additive_helpers import VOCAB, perturb, small
from helpers import ids, tiny
from tunesmith.errors import ConfigError
from tunesmith.infer.engine import Engine, Request, SamplingParams, UnknownModel
from tunesmith.infer.engine.adapters import MultiLoraLinear, per_row_reasons
from tunesmith.methods import registry


def _adapter(base, tmp_path, name, method="lora", seed=0, **options):
    model = tunesmith.apply(copy.deepcopy(base), method, **options)
    perturb(model, scale=0.3, seed=seed)
    out = registry.attached(model).save(model, tmp_path / name, "random:llama")
    return model.eval(), out


def _greedy(model, prompt, n):
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _prompts(n=6):
    x = ids(n, 9, vocab=VOCAB, seed=4).tolist()
    return [row[: 3 + i] for i, row in enumerate(x)]


@pytest.fixture
def served(tmp_path, tokenizer):
    base = small()
    a_model, a_dir = _adapter(base, tmp_path, "a", r=4, target_modules=["q_proj", "v_proj"], seed=1)
    b_model, b_dir = _adapter(base, tmp_path, "b", r=2, use_rslora=True, alpha=8, seed=2)
    plain = copy.deepcopy(base).eval()
    engine = Engine(base, tokenizer, fast=False, max_batch=8)   # wraps the base's layers in place
    assert engine.add_adapter("a", a_dir) == "per-row" and engine.add_adapter("b", b_dir) == "per-row"
    return engine, {"base": plain, "a": a_model, "b": b_model}


def test_mixed_adapter_batch_equals_each_adapter_alone(served):
    engine, alone = served
    names = ["base", "a", "b", "a", "b", "base"]
    lengths = [4, 6, 3, 5, 6, 2]
    hs = [engine.submit(Request(prompt=p, model=n, params=SamplingParams(max_tokens=k, ignore_eos=True)))
          for p, n, k in zip(_prompts(), names, lengths)]
    engine.run_until_done()
    for h, p, n, k in zip(hs, _prompts(), names, lengths):
        assert h.result().token_ids == _greedy(alone[n], p, k), n
    assert engine.routes["base"].lane.max_rows == 6                      # one forward pass for all six
    got = {n: _greedy(alone[n], _prompts()[1], 6) for n in alone}
    assert len({tuple(v) for v in got.values()}) == 3                    # the adapters matter


def test_adapters_load_and_unload_at_run_time(served, tmp_path):
    engine, alone = served
    q = engine.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(q, MultiLoraLinear) and sorted(q.parts) == [0, 1]
    engine.remove("a")
    with pytest.raises(UnknownModel):
        engine.submit(Request(prompt="x", model="a"))
    assert sorted(q.parts) == [1]
    p = _prompts()[2]
    assert engine.generate([p], model="b", params=SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids \
        == _greedy(alone["b"], p, 5)
    engine.remove("b")
    assert type(engine.base_model.model.layers[0].self_attn.q_proj) is nn.Linear   # unwrapped again
    _, c_dir = _adapter(alone["base"], tmp_path, "c", r=3, seed=3)
    engine.add_adapter("c", c_dir)
    assert engine.models() == ["base", "c"]


def test_requests_for_a_removed_adapter_are_cancelled(served):
    engine, _ = served
    h = engine.submit(Request(prompt=_prompts()[0], model="a", params=SamplingParams(max_tokens=50, ignore_eos=True)))
    engine.step()
    engine.remove("a")
    assert h.result(timeout=5).finish_reason == "cancelled"


def test_what_cannot_share_the_base_gets_its_own_lane(tmp_path, tokenizer):
    base = tiny("llama")          # what tunesmith.load("random:llama") rebuilds
    d_model, d_dir = _adapter(base, tmp_path, "d", "dora", r=2, seed=4)
    b_model, b_dir = _adapter(base, tmp_path, "bias", r=2, bias="all", seed=5)
    assert any("DoRA" in r for r in per_row_reasons(d_dir))
    assert any("bias" in r for r in per_row_reasons(b_dir))
    engine = Engine(copy.deepcopy(base), tokenizer, fast=False)
    assert engine.add_adapter("d", d_dir) == "own" and engine.add_adapter("bias", b_dir) == "own"
    p = ids(1, 5, seed=2)[0].tolist()
    for name, model in (("d", d_model), ("bias", b_model)):
        assert engine.generate([p], model=name, params=SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids \
            == _greedy(model, p, 4)
    assert engine.generate([p], params=SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids \
        == _greedy(base, p, 4)   # the base was not changed by loading them


def test_factors_for_another_base_are_refused(tokenizer):
    engine = Engine(small(), tokenizer, fast=False)
    bad = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(64, 2), 1.0)}
    with pytest.raises(ConfigError, match="q_proj is 64x64 here"):
        engine.add_lora("x", bad)
    with pytest.raises(ConfigError, match="not a linear layer"):
        engine.add_lora("y", {"model.nope": (torch.zeros(2, 64), torch.zeros(64, 2), 1.0)})
    assert engine.models() == ["base"]


def test_mixed_batch_equals_peft_mixed_adapter_batch(tokenizer):
    """peft's own mixed-adapter batch (``generate(adapter_names=...)``) as the independent oracle."""
    peft = pytest.importorskip("peft")
    base = small()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    g = torch.Generator().manual_seed(0)
    factors = []
    for _ in range(3):
        f = {}
        for name, m in base.named_modules():
            if name.rsplit(".", 1)[-1] in targets:
                f[name] = (torch.randn(4, m.in_features, generator=g) * 0.3,
                           torch.randn(m.out_features, 4, generator=g) * 0.3, 2.0)
        factors.append(f)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="l0")
    for i in (1, 2):
        pm.add_adapter(f"l{i}", cfg)
    with torch.no_grad():
        for i, f in enumerate(factors):
            for name, (a, b, _) in f.items():
                mod = pm.base_model.model.get_submodule(name)
                mod.lora_A[f"l{i}"].weight.copy_(a)
                mod.lora_B[f"l{i}"].weight.copy_(b)
    pm.eval()
    engine = Engine(base, tokenizer, fast=False, max_batch=8)
    for i, f in enumerate(factors):
        engine.add_lora(f"l{i}", f)
    x = ids(6, 7, vocab=VOCAB, seed=11)
    names = ["l0", "l1", "l2", "__base__", "l1", "l0"]
    got = [engine.submit(Request(prompt=row, model=None if n == "__base__" else n,   # peft's name for the base
                                 params=SamplingParams(max_tokens=6, ignore_eos=True)))
           for row, n in zip(x.tolist(), names)]
    engine.run_until_done()
    with torch.no_grad():
        want = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                           pad_token_id=0, eos_token_id=None, adapter_names=names)[:, 7:].tolist()
    assert [h.result().token_ids for h in got] == want


def test_a_wrapped_layer_equals_the_lora_formula_row_by_row():
    """Hu et al. 2021, eq. 3, written out per row: y_b = W0 x_b + bias + s_a B_a A_a x_b for row b's
    adapter a (none: W0 x_b + bias). The wrapped layer's base weight is W's first d_out rows."""
    from tunesmith.infer.engine.adapters import AdapterTable
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    holder = nn.Sequential(base)
    table = AdapterTable(holder)
    adapters = {name: (torch.randn(r, 12, generator=g), torch.randn(10, r, generator=g), s)
                for name, r, s in (("a", 2, 0.5), ("b", 3, 2.0))}
    w0, bias = base.weight.detach().clone(), base.bias.detach().clone()
    slots = {name: table.add(name, {"0": f}) for name, f in adapters.items()}
    layer = holder[0]
    assert isinstance(layer, MultiLoraLinear)
    assert layer.W.shape == (10 + 5, 12) and layer.B.shape == (10, 5)
    assert layer.base_layer.weight.data_ptr() == layer.W.data_ptr()      # a view of W's first rows
    x = torch.randn(4, 3, 12, generator=g)
    rows = ["a", None, "b", "a"]
    with table.bind(torch.tensor([slots[r] if r else -1 for r in rows])):
        got = layer(x)
    for i, name in enumerate(rows):
        want = x[i] @ w0.T + bias
        if name:
            a, b, s = adapters[name]
            want = want + s * (x[i] @ a.T) @ b.T
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    table.remove("a")
    with table.bind(torch.tensor([-1, slots["b"]])):
        got = layer(x[:2])
    a, b, s = adapters["b"]
    torch.testing.assert_close(got[1], x[1] @ w0.T + bias + s * (x[1] @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], x[0] @ w0.T + bias, rtol=1e-5, atol=1e-5)
