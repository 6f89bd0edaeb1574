"""QLoRA: the config path, the one clear error without bitsandbytes or a 4-bit backend, the apply /
merge / save plumbing against a stand-in for bitsandbytes, and (with bitsandbytes installed) the real
4-bit base on the CPU against peft's LoRA on the same base."""
from __future__ import annotations

import copy
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tunesmith
from tunesmith import config as config_mod
from tunesmith.errors import ConfigError
from tunesmith.methods import qlora, registry
from tunesmith.methods.lora import Lora
from tunesmith.methods.qlora import QloraLinear

from helpers import ids, rel_err, tiny


def test_config_path(tmp_path):
    data = {"model": {"name_or_path": "random:llama"}, "data": {"train": "x.jsonl"},
            "method": {"name": "qlora", "r": 16, "alpha": 32, "quant_type": "fp4", "double_quant": False,
                       "use_rslora": True, "lr_ratio_b": 8}}
    cfg = config_mod.load(data)
    assert (cfg.method.quant_type, cfg.method.double_quant, cfg.method.r) == ("fp4", False, 16)
    assert config_mod.load({**data, "method": {"name": "qlora"}}).method.quant_type == "nf4"
    with pytest.raises(ConfigError, match=r"method\.quant_type.*int4"):
        config_mod.load({**data, "method": {"name": "qlora", "quant_type": "int4"}})
    with pytest.raises(ConfigError, match="pissa"):
        config_mod.load({**data, "method": {"name": "qlora", "init": "pissa"}})


def test_clear_error_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"bitsandbytes, which is not installed.*method.name: lora"):
        tunesmith.apply(tiny(), "qlora")


def test_clear_error_without_a_4bit_backend_on_the_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bnb())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(qlora, "cpu_4bit", lambda: False)     # a bitsandbytes without its CPU backend
    with pytest.raises(ConfigError, match=r"model is on cpu.*no 4-bit layers there.*method.name: lora"):
        tunesmith.apply(tiny(), "qlora")
    with pytest.raises(ConfigError, match="paged_adamw_8bit.*CUDA"):
        qlora.paged_adamw_8bit([], None)


# -- plumbing against a stand-in for bitsandbytes -------------------------------------------------
def _fake_bnb():
    """Linear4bit/Params4bit with bitsandbytes' constructor signatures; weights stay dense."""
    class Params4bit(nn.Parameter):
        def __new__(cls, data=None, requires_grad=False, **kw):
            self = torch.Tensor._make_subclass(cls, data, requires_grad)
            self.__dict__.update(kw)
            self.quant_state = ("state", kw.get("quant_type"), kw.get("compress_statistics"))
            return self

        def to(self, *args, **kwargs):
            return self

    class Linear4bit(nn.Linear):
        def __init__(self, input_features, output_features, bias=True, compute_dtype=None,
                     compress_statistics=True, quant_type="fp4", quant_storage=torch.uint8, device=None):
            super().__init__(input_features, output_features, bias, device=device)
            self.compute_dtype = compute_dtype
            self.weight = Params4bit(self.weight.data, quant_type=quant_type,
                                     compress_statistics=compress_statistics, module=self)

        def forward(self, x):
            return F.linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)

    bnb = types.ModuleType("bitsandbytes")
    bnb.nn = types.SimpleNamespace(Linear4bit=Linear4bit, Params4bit=Params4bit)
    bnb.functional = types.SimpleNamespace(dequantize_4bit=lambda data, state: data.clone())
    bnb.optim = types.SimpleNamespace(PagedAdamW8bit=lambda groups, **kw: ("paged", groups, kw))
    return bnb


@pytest.fixture
def fake_gpu(monkeypatch):
    bnb = _fake_bnb()
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(qlora, "check_device", lambda model: None)
    monkeypatch.setattr(qlora, "compute_dtype", lambda device: torch.bfloat16)   # as on CUDA
    return bnb


def test_apply_quantizes_every_block_linear_and_adds_lora(fake_gpu):
    model = tunesmith.apply(tiny(), "qlora", r=4, target_modules=["q_proj", "v_proj"], quant_type="nf4")
    q4 = [n for n, m in model.named_modules() if isinstance(m, fake_gpu.nn.Linear4bit)]
    assert len(q4) == 2 * 7 and not any("lm_head" in n for n in q4)
    first = model.get_submodule("model.layers.0.mlp.down_proj")
    assert first.weight.quant_state == ("state", "nf4", True) and first.compute_dtype == torch.bfloat16
    wrapped = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(wrapped, QloraLinear) and isinstance(wrapped.base_layer, fake_gpu.nn.Linear4bit)
    assert wrapped.lora_A.weight.dtype == torch.bfloat16
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2


def test_merge_dequantizes_to_plain_linears(fake_gpu):
    model = tunesmith.apply(tiny(), "qlora", r=4)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float() + torch.randn_like(p.data.float()) * 0.05  # as upcast + trained
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        merged = registry.attached(model).merge(model)
        after = merged(input_ids=x).logits
    assert not any(isinstance(m, fake_gpu.nn.Linear4bit) for m in merged.modules())
    assert type(merged.get_submodule("model.layers.1.mlp.up_proj")) is nn.Linear
    assert rel_err(after, before) < 2e-2  # bf16 weights after merging


def test_saved_adapter_is_plain_lora(fake_gpu, tmp_path):
    model = tunesmith.apply(tiny(), "qlora", r=4, quant_type="fp4")
    method = registry.attached(model)
    path = method.save(model, tmp_path, "base-model-dir")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["use_dora"], cfg["base_model_name_or_path"]) == ("LORA", False, "base-model-dir")
    loaded = qlora.Qlora.load_artifact(tiny(), path)
    assert type(registry.attached(loaded)) is Lora
    assert not any(isinstance(m, fake_gpu.nn.Linear4bit) for m in loaded.modules())


def test_paged_adamw_8bit_uses_train_settings(fake_gpu):
    cfg = types.SimpleNamespace(lr=1e-4, adam_betas=(0.9, 0.95), adam_eps=1e-6, weight_decay=0.01)
    kind, groups, kw = qlora.paged_adamw_8bit([{"params": []}], cfg)
    assert kind == "paged" and kw == {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.01}


def test_layers_already_in_4_bits_are_kept(fake_gpu):
    model = tiny()
    pre = fake_gpu.nn.Linear4bit(128, 64, False, torch.bfloat16, quant_type="fp4", device="meta")
    model.model.layers[0].mlp.down_proj = pre
    tunesmith.apply(model, "qlora", r=2, target_modules=["q_proj"])
    assert model.model.layers[0].mlp.down_proj is pre


# -- on a GPU with bitsandbytes: the real 4-bit base ------------------------------------------------
def _real_bnb() -> bool:
    import importlib.util
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not _real_bnb(), reason="needs CUDA and bitsandbytes")
def test_a_run_never_holds_the_full_precision_blocks_on_the_gpu(alpaca_file, tmp_path):
    """The model loads on the CPU and each layer is quantized on its way to the GPU, so the GPU's
    peak while building is the finished model plus about one bf16 layer, not plus the bf16 blocks."""
    from helpers import run_config
    from tunesmith.train import runner
    data = run_config(alpaca_file, tmp_path, {"name": "qlora", "r": 4}, max_steps=2, lr=1e-3)
    data["model"] = {"name_or_path": "random:llama", "device": "cuda",
                     "random_overrides": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4,
                                          "num_attention_heads": 8, "num_key_value_heads": 8}}
    cfg = config_mod.load(data)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    *_, model, method, _ = runner.build(cfg, "sft")
    peak = torch.cuda.max_memory_allocated() - before
    final = torch.cuda.memory_allocated() - before
    import bitsandbytes as bnb
    q4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(q4) == 4 * 7 and all(p.is_cuda for p in model.parameters())
    bf16_blocks = 4 * (4 * 1024 * 1024 + 3 * 1024 * 4096) * 2     # 134 MB; a bf16 MLP weight is 8 MB
    assert peak - final < 0.25 * bf16_blocks, (peak, final, bf16_blocks)
    del model, method
    run_dir, metrics = tunesmith.train(data)                    # and it trains, 4-bit base on the GPU
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["split"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))


# -- on the CPU with bitsandbytes' CPU backend: the real 4-bit base --------------------------------
@pytest.fixture
def cpu_bnb():
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None or not qlora.cpu_4bit():
        pytest.skip("needs bitsandbytes with its CPU backend")
    import bitsandbytes
    return bitsandbytes


def _quantized(model, bnb):
    """``model`` with every block linear layer in NF4 on the CPU, quantized as QLoRA does."""
    from tunesmith.methods.inject import replace_module
    for name in qlora.quantized_layers(model):
        replace_module(model, name, qlora.quantize_linear(bnb, model.get_submodule(name), "nf4", True))
    return model


def test_cpu_4bit_base_matches_peft_lora_on_the_same_base(cpu_bnb):
    """peft's LoRA on bitsandbytes' 4-bit layers is the oracle: the same quantized base and factors give
    the same logits and factor gradients, and the base stays within NF4's error of full precision."""
    import peft
    from test_lora import LLAMA_TARGETS, VOCAB, assert_parity, copy_from_peft, perturb_peft
    base = tiny(seed=1, vocab_size=VOCAB)
    model = tunesmith.apply(copy.deepcopy(base), "qlora", r=4, alpha=8)
    pm = peft.get_peft_model(_quantized(copy.deepcopy(base), cpu_bnb),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    q4 = [m for m in model.modules() if isinstance(m, cpu_bnb.nn.Linear4bit)]
    assert len(q4) == 2 * 7 and all(m.compute_dtype == torch.float32 for m in q4)
    x = ids(vocab=VOCAB)
    with torch.no_grad():
        assert 1e-4 < rel_err(model(input_ids=x).logits, base(input_ids=x).logits) < 0.2   # NF4, B = 0
    perturb_peft(pm)
    copy_from_peft(model, pm)
    assert_parity(model, pm, tol=1e-5)


def test_cpu_qlora_run_trains_and_saves_a_plain_lora(cpu_bnb, alpaca_file, tmp_path):
    from helpers import run_config
    data = run_config(alpaca_file, tmp_path, {"name": "qlora", "r": 4}, max_steps=6, lr=3e-3)
    run_dir, _ = tunesmith.train(data)
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["split"] == "train"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_loss_after"] < summary["train_loss_before"]
    loaded = tunesmith.load(run_dir)[0]
    assert type(registry.attached(loaded)) is Lora
    assert not any(isinstance(m, cpu_bnb.nn.Linear4bit) for m in loaded.modules())
