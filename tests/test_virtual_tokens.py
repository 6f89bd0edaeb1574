"""Virtual-token methods (prompt, P-tuning v1/v2, prefix) through a user's whole workflow on the
installed transformers: train in the one loop, ``tunesmith.load``, ``tunesmith.generate``, peft
loading the adapter, ``merge`` and ``export`` refusing with the reason. Also the one place that knows
what differs between transformers releases (``tunesmith.models.compat``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tunesmith
from helpers import alpaca_rows, peft_oracle, rel_err, run_config, tiny, write_jsonl
from tunesmith.errors import ConfigError
from tunesmith.export import ExportRefused, export
from tunesmith.infer.generate import prompt_ids
from tunesmith.methods import registry
from tunesmith.methods._prompting import VirtualMethod
from tunesmith.methods.inject import disable_adapters
from tunesmith.models import compat

VIRTUAL = sorted(n for n, c in registry.all_methods().items() if issubclass(c, VirtualMethod))
OPTIONS = {"ptuning": {"encoder_hidden": 16}, "prefix": {"reparam_hidden": 16}}


def test_every_virtual_token_method_is_covered():
    assert {"prompt", "ptuning", "prefix", "ptuning_v2"} <= set(VIRTUAL)


@pytest.fixture(scope="module", params=VIRTUAL)
def trained(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    f = write_jsonl(tmp / "a.jsonl", alpaca_rows(8))
    method = {"name": name, "num_virtual_tokens": 4, **OPTIONS.get(name, {})}
    run_dir, summary = tunesmith.train(run_config(f, tmp, method, max_steps=2, lr=5e-2))
    return name, run_dir, summary, tmp


def test_train_load_generate(trained):
    name, run_dir, summary, _ = trained
    assert summary["steps"] == 2 and summary["trainable_params"] > 0
    model, tok = tunesmith.load(run_dir, device="cpu")
    assert registry.attached(model).name == name
    x = torch.tensor([prompt_ids(tok, "Add 2 and 3.", None)])
    direct = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                            pad_token_id=tok.pad_token_id)
    text = tunesmith.generate(run_dir, "Add 2 and 3.", max_new_tokens=4, device="cpu")
    assert text == tok.decode(direct[0, x.shape[1]:], skip_special_tokens=True)
    with torch.no_grad():
        with disable_adapters(model):
            base = model(input_ids=x).logits
        assert rel_err(model(input_ids=x).logits, base) > 1e-4  # the trained tokens change the output


def test_peft_loads_the_adapter_with_the_same_logits(trained):
    from peft import PeftModel
    name, run_dir, _, _ = trained
    ours, tok = tunesmith.load(run_dir, device="cpu")
    x = torch.tensor([prompt_ids(tok, "Add 4 and 5.", None)])
    base = tiny("llama", seed=42)  # the run's base: random:llama at the run's seed
    with peft_oracle(f"{name} on a causal LM"), torch.no_grad():
        theirs = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        expected = theirs(input_ids=x, attention_mask=torch.ones_like(x)).logits
    n = expected.shape[1] - x.shape[1]  # peft returns logits for its virtual positions too
    with torch.no_grad():
        got = ours(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert rel_err(got, expected[:, n:]) <= 1e-5


def test_merge_refuses_and_writes_nothing(trained):
    name, run_dir, _, tmp = trained
    out = tmp / "merged"
    with pytest.raises(ConfigError, match=rf"merge: {name} cannot be folded.*virtual tokens"):
        tunesmith.merge(run_dir, out)
    assert not out.exists()


@pytest.mark.parametrize("target", ["vllm", "llama.cpp"])
def test_export_refuses_without_offering_a_merge(trained, target):
    name, run_dir, _, tmp = trained
    with pytest.raises(ExportRefused) as err:
        export(run_dir, target, out=tmp / f"e-{target}")
    assert f"Nor can {name} be merged" in str(err.value) and "tunesmith merge" not in str(err.value)
    assert export(run_dir, "peft", out=tmp / f"peft-{target}").out_dir.is_dir()


# -- the compat seam ------------------------------------------------------------------------------
class _Old(nn.Module):
    def forward(self, input_ids=None, past_key_values=None):
        return input_ids


class _New(nn.Module):
    def forward(self, input_ids=None, cache=None, **kwargs):
        return input_ids


class _KwargsOnly(nn.Module):
    def forward(self, **kwargs):
        return kwargs


@pytest.mark.parametrize("module,name", [(_Old(), "past_key_values"), (_New(), "cache"),
                                         (_KwargsOnly(), "past_key_values")])
def test_cache_is_passed_under_the_name_the_release_takes(module, name):
    assert compat.cache_name(module) == name
    cache = object()
    assert compat.cache_kwargs(module, cache) == {name: cache}
    for given in compat.CACHE_NAMES:
        kwargs = {given: cache, "input_ids": 1}
        assert compat.pop_cache(kwargs) is cache and kwargs == {"input_ids": 1}


def test_the_installed_transformers_model_takes_the_name_compat_picks():
    import inspect
    model = tunesmith.load("random:llama", device="cpu")[0]
    params = inspect.signature(type(model.model).forward).parameters
    assert compat.cache_name(model.model) in params
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert compat.output_cache(out).get_seq_length() == 3
