"""AdaLoRA: peft parity (logits, gradients with the orthogonality term, 30-step curve with rank
allocation), the same rank allocation as peft's RankAllocator, rank_pattern save/load both ways."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import tunesmith
from tunesmith import api  # api.train: `tunesmith.train` is shadowed by the subpackage once imported
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.methods.adalora import AdaLora, adalora_trainable_count

from helpers import rel_err, tiny
from test_lora import (LLAMA_TARGETS, assert_curves_match, assert_parity, batch, copy_from_peft,  # noqa: F401
                       ours_name, pair, perturb_peft, train_curve)

SCHEDULE = dict(init_r=6, target_r=2, tinit=5, tfinal=5, deltaT=2)


def _pair(total=30, **sched):
    sched = {**SCHEDULE, **sched}
    cfg = peft.AdaLoraConfig(task_type="CAUSAL_LM", total_step=total, lora_alpha=8, target_modules=LLAMA_TARGETS, **sched)
    base, model, pm = pair(cfg, "adalora", total_steps=total, alpha=8, **sched)
    perturb_peft(pm)
    copy_from_peft(model, pm)
    return base, model, pm


def _reg(model):
    return registry.attached(model).regularization(model)


def test_logits_and_gradients_match_peft():
    _, model, pm = _pair()
    assert _reg(model) > 0
    assert_parity(model, pm, extra=_reg)


def test_training_curve_with_allocation_matches_peft():
    _, model, pm = _pair()
    method = registry.attached(model)
    ours = train_curve(model, extra=_reg, after_step=lambda s: method.after_optimizer_step(model, s))
    theirs = train_curve(pm, after_step=pm.base_model.update_and_allocate)
    assert_curves_match(ours, theirs)
    pattern = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert {f"{n}.lora_E": m.tolist() for n, m in method.allocator.rank_pattern.items()} == pattern


def test_same_rank_allocation_as_peft_rank_allocator():
    """Fed identical gradients step by step, both mask the same triplets at every step."""
    _, model, pm = _pair(total=20, tinit=2, tfinal=4, deltaT=3)
    method = registry.attached(model)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {ours_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    layer_scale = {n: 1 + i % 5 for i, n in enumerate(sorted(ours))}  # uneven importance across layers
    for step in range(20):
        for n, p in ours.items():
            grad = torch.randn(p.shape, generator=g) * layer_scale[n]
            p.grad, theirs[n].grad = grad.clone(), grad.clone()
        method.after_optimizer_step(model, step)
        pm.base_model.update_and_allocate(step)
        for n in ours:
            if n.endswith("lora_E"):
                assert torch.equal(ours[n], theirs[n]), (step, n)
    kept = {n: int(m.sum()) for n, m in method.allocator.rank_pattern.items()}
    assert sum(kept.values()) == 2 * len(kept)  # the final budget: target_r per layer on average
    assert len(set(kept.values())) > 1          # and it is spread unevenly


def test_saved_adapter_has_rank_pattern_and_peft_loads_it(tmp_path):
    base, model, pm = _pair(total=8, tinit=1, tfinal=2, deltaT=1)
    method = registry.attached(model)
    train_curve(model, steps=8, extra=_reg, after_step=lambda s: method.after_optimizer_step(model, s))
    path = method.save(model, tmp_path, "base")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and len(cfg["rank_pattern"]) == 14
    from safetensors.torch import load_file
    tensors = load_file(path / "adapter_model.safetensors")
    assert sum(v.shape[0] for k, v in tensors.items() if k.endswith("lora_E")) == 2 * 14
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    ours_again = AdaLora.load_artifact(copy.deepcopy(base), path).eval()
    x = batch()
    with torch.no_grad():
        want = model.eval()(input_ids=x).logits
        assert rel_err(loaded(input_ids=x).logits, want) < 1e-5
        assert rel_err(ours_again(input_ids=x).logits, want) < 1e-5


def test_loads_peft_adalora_adapter(tmp_path):
    base, _, pm = _pair(total=8, tinit=1, tfinal=2, deltaT=1)
    train_curve(pm, steps=8, after_step=pm.base_model.update_and_allocate)
    pm.save_pretrained(tmp_path / "a")
    loaded = AdaLora.load_artifact(copy.deepcopy(base), tmp_path / "a").eval()
    x = batch()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=x).logits, pm.eval()(input_ids=x).logits) < 1e-5


def test_budget_schedule_is_cubic():
    model = tunesmith.apply(tiny(), "adalora", init_r=6, target_r=2, total_steps=30, tinit=5, tfinal=5)
    alloc = registry.attached(model).allocator
    b0, bt = 6 * 14, 2 * 14
    assert alloc.budget(5) == (b0, False)
    assert alloc.budget(15) == (int((b0 - bt) * (1 - 10 / 20) ** 3 + bt), True)
    assert alloc.budget(26)[0] == bt


@pytest.mark.parametrize("opts,field", [
    ({"total_steps": 10, "tinit": 8, "tfinal": 2}, "tinit"),
    ({"total_steps": 10, "init_r": 2, "target_r": 4}, "target_r"),
])
def test_config_errors_name_the_field(opts, field):
    with pytest.raises(ConfigError, match=field):
        tunesmith.apply(tiny(), "adalora", **opts)


def test_total_steps_is_needed_before_the_first_step_outside_a_run():
    model = tunesmith.apply(tiny(), "adalora", init_r=4, target_r=2)
    with pytest.raises(ConfigError, match="total_steps is not set"):
        registry.attached(model).after_optimizer_step(model, 0)


def test_a_run_takes_its_step_count_as_the_schedule(alpaca_file, tmp_path):
    from helpers import run_config
    cfg = run_config(alpaca_file, tmp_path, {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2},
                     max_steps=6)
    run_dir, _ = api.train(cfg)
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["total_step"] == 6
    kept = [sum(m) for m in adapter_cfg["rank_pattern"].values()]
    assert sum(kept) == 2 * len(kept)                       # pruned to the final budget on step 6 - tfinal
    bad = run_config(alpaca_file, tmp_path / "b", {"name": "adalora", "tinit": 5, "tfinal": 2}, max_steps=6)
    with pytest.raises(ConfigError, match="run's 6 steps.*tinit"):
        api.train(bad)
    assert not (tmp_path / "b" / "run").exists()


def test_trainable_count_closed_form():
    model = tunesmith.apply(tiny(), "adalora", init_r=3, total_steps=5, target_r=1, target_modules=["v_proj"])
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == adalora_trainable_count(model, 3, registry.attached(model).targets) == 2 * 3 * (64 + 32 + 1)


def test_run_end_to_end(alpaca_file, tmp_path):
    from helpers import run_config
    cfg = run_config(alpaca_file, tmp_path, {"name": "adalora", "init_r": 4, "target_r": 2, "total_steps": 6,
                                             "tinit": 1, "tfinal": 2}, max_steps=6)
    run_dir, metrics = api.train(cfg)
    assert metrics["train_loss_after"] < metrics["train_loss_before"]
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    ckpt = next((run_dir / "checkpoints").iterdir())
    from safetensors.torch import load_file
    assert any(k.endswith(".rank_mask") for k in load_file(ckpt / "trainable.safetensors"))
    model, _ = tunesmith.load(run_dir)
    kept = sum(m.lora_E.shape[0] for _, m in model.named_modules() if hasattr(m, "lora_E"))
    assert kept == 2 * 14
