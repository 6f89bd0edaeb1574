"""Architecture families beyond Llama and BERT: GPT-2's Conv1D layers, mixture-of-experts weights, unknown
architectures. peft is the oracle: the same weights give the same logits (and gradients), and adapters
load both ways."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

import tunesmith
from helpers import rel_err, tiny
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods import registry
from tunesmith.methods._param_lora import ParamLora, param_lora_count
from tunesmith.methods.freeze import param_types
from tunesmith.models.families import FAMILIES
from tunesmith.models.loader import ModelConfig, load_model

VOCAB = 512


def small(family: str, seed: int = 1):
    return tiny(family, task=FAMILIES[family].task, seed=seed, vocab_size=VOCAB).eval()


def inputs(family: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    out = {"input_ids": x, "attention_mask": mask}
    if FAMILIES[family].kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(5, VOCAB, (2, 5), generator=g)
    return out


def peft_key(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".default", "")


def tie(ours, theirs, marker: str, scale: float = 0.1) -> None:
    """Give both sides the same random adapter weights (peft's parameters, renamed, are ours)."""
    g = torch.Generator().manual_seed(7)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if marker in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)
                mine[peft_key(n)].copy_(p)


def peft_pair(family: str, method: str, **options):
    base = small(family)
    ours = tunesmith.apply(copy.deepcopy(base), method, **options)
    ours.eval()
    cfg = registry.attached(ours).peft_config(ours, "unused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that it sets fan_in_fan_out for Conv1D itself
        if method == "ia3":
            peft_cfg = IA3Config(target_modules=cfg["target_modules"], feedforward_modules=cfg["feedforward_modules"],
                                 fan_in_fan_out=cfg["fan_in_fan_out"])
        else:
            peft_cfg = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"] or None,
                                  target_parameters=cfg.get("target_parameters"), fan_in_fan_out=cfg["fan_in_fan_out"])
        theirs = get_peft_model(copy.deepcopy(base), peft_cfg).eval()
    tie(ours, theirs, "ia3_l" if method == "ia3" else "lora_")
    return base, ours, theirs


CASES = [("gpt2", "lora", {}), ("gpt2", "ia3", {}), ("t5", "lora", {}), ("t5", "ia3", {}), ("flan-t5", "ia3", {}),
         ("mixtral", "lora", {"target_parameters": ["experts", "router"]}),
         ("qwen2_moe", "lora", {"target_modules": ["q_proj", "down_proj"], "target_parameters": ["experts"]})]


@pytest.mark.parametrize("family,method,options", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_same_weights_same_logits_and_gradients_as_peft(family, method, options):
    _, ours, theirs = peft_pair(family, method, **options)
    x = inputs(family)
    a, b = ours(**x).logits, theirs(**x).logits
    assert rel_err(a, b) < 1e-5
    a.pow(2).mean().backward()
    b.pow(2).mean().backward()
    theirs_grads = {peft_key(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(theirs_grads)
    for n, g in ours_grads.items():
        assert rel_err(g, theirs_grads[n]) < 1e-5, n


@pytest.mark.parametrize("family,method,options", CASES[:1] + CASES[5:6], ids=["gpt2-lora", "mixtral-experts"])
def test_adapters_load_both_ways_with_peft(family, method, options, tmp_path):
    base, ours, theirs = peft_pair(family, method, **options)
    x = inputs(family)
    path = registry.attached(ours).save(ours, tmp_path / "ours", "unused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    assert rel_err(loaded(**x).logits, ours(**x).logits) < 1e-5
    theirs.save_pretrained(tmp_path / "peft")
    back = registry.get(method).load_artifact(copy.deepcopy(base), tmp_path / "peft").eval()
    assert rel_err(back(**x).logits, theirs(**x).logits) < 1e-5


def test_gpt2_merges_back_into_conv1d_layers(tmp_path):
    _, ours, _ = peft_pair("gpt2", "lora")
    x = inputs("gpt2")
    before = ours(**x).logits
    merged = registry.attached(ours).merge(ours)
    layer = merged.transformer.h[0].attn.c_attn
    assert type(layer) is Conv1D and tuple(layer.weight.shape) == (64, 192)  # (d_in, d_out), as GPT-2 stores it
    merged.save_pretrained(tmp_path / "m")
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert rel_err(again(**x).logits, before) < 1e-5


def test_experts_only_by_choice():
    model = tunesmith.apply(small("mixtral"), "lora", r=2, target_modules=[], target_parameters=["experts"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".experts." in n for n in trainable)
    names = registry.attached(model).param_targets
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == param_lora_count(small("mixtral"), 2, names)


def test_experts_and_router_stay_frozen_by_default():
    model = tunesmith.apply(small("mixtral"), "lora")
    assert not any(isinstance(m, ParamLora) for m in model.modules())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".experts." in n or ".gate." in n)


def test_parameter_targets_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match="3-D"):
        tunesmith.apply(small("llama"), "lora", target_parameters=["experts"])
    with pytest.raises(ConfigError, match="dropout"):
        tunesmith.apply(small("mixtral"), "lora", dropout=0.1, target_parameters=["experts"])
    with pytest.raises(ConfigError, match="use method lora"):
        tunesmith.apply(small("mixtral"), "dora", target_parameters=["experts"])


def test_freeze_counts_experts_and_router_as_feed_forward():
    kinds = param_types(small("mixtral"))
    assert "mlp" in kinds["model.layers.0.mlp.experts.gate_up_proj"]
    assert "mlp" in kinds["model.layers.0.mlp.gate.weight"]
    model = tunesmith.apply(small("mixtral"), "freeze", layers="none", types=["mlp"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, k in kinds.items() if "mlp" in k}


def test_unknown_architecture_names_its_linear_layers():
    config = tf.AutoConfig.for_model("opt", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32)
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError) as e:
        tunesmith.apply(model, "lora")
    msg = str(e.value)
    for part in ("'opt'", "self_attn.q_proj", "fc1", "all-linear", "method.target_modules"):
        assert part in msg
    tunesmith.apply(model, "lora", target_modules="all-linear")  # and naming them works


def test_random_families_and_tasks_are_checked():
    with pytest.raises(ModelError, match="random:gpt2"):
        load_model(ModelConfig(name_or_path="random:gtp2", device="cpu"))
    with pytest.raises(ModelError, match="seq2seq"):
        load_model(ModelConfig(name_or_path="random:t5", device="cpu"), task="causal_lm")
    with pytest.raises(ModelError, match="not an encoder-decoder"):
        load_model(ModelConfig(name_or_path="random:llama", device="cpu"), task="seq2seq")
    for name, fam in FAMILIES.items():
        config = tunesmith.models.loader.model_config(ModelConfig(name_or_path=f"random:{name}"))
        assert config.model_type == fam.model_type
        assert bool(getattr(config, "is_encoder_decoder", False)) == (fam.kind == "seq2seq")


def test_export_refuses_expert_adapters_where_the_runtime_cannot_load_them(tmp_path):
    from tunesmith.export import ExportRefused, export
    model = tunesmith.apply(small("mixtral"), "lora", r=2, target_parameters=["experts"])
    path = registry.attached(model).save(model, tmp_path, "unused")
    with pytest.raises(ExportRefused, match="target_parameters"):
        export(path, "vllm", out=tmp_path / "v")
    assert export(path, "peft", out=tmp_path / "p").out_dir.is_dir()
