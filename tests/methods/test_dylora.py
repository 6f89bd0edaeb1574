"""DyLoRA: nested ranks (truncation equals a LoRA of that rank), per-step rank sampling, every rank
better than the base after one run, export at a rank, and the eval-ranks table and plot."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import tunesmith
from tunesmith import api, cli  # api.train: `tunesmith.train` is shadowed by the subpackage once imported
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.methods.dylora import DyLora, DyLoraLinear, dylora_trainable_count, set_rank
from tunesmith.methods.lora import Lora, LoraLinear

from helpers import ids, rel_err, run_config, tiny


def _trained_layer(r_max=6, alpha=12.0):
    base = torch.nn.Linear(16, 8)
    layer = DyLoraLinear(base, r_max, alpha, 0.0)
    layer.reset("kaiming")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


@pytest.mark.parametrize("b", [1, 3, 6])
def test_truncation_equals_lora_of_that_rank(b):
    layer = _trained_layer()
    layer.set_rank(b)
    lora = LoraLinear(layer.base_layer, b, 12.0, 0.0)
    with torch.no_grad():
        lora.lora_A.weight.copy_(layer.lora_A.weight[:b])
        lora.lora_B.weight.copy_(layer.lora_B.weight[:, :b])
    x = torch.randn(4, 16)
    assert rel_err(layer(x), lora(x)) < 1e-6
    assert rel_err(layer.delta_weight(), lora.delta_weight()) < 1e-6


def test_each_step_samples_a_rank_in_range_and_uses_only_those_rows():
    model = tunesmith.apply(tiny(), "dylora", r_min=2, r_max=6)
    method = registry.attached(model)
    layers = [m for m in model.modules() if isinstance(m, DyLoraLinear)]
    seen = set()
    for step in range(40):
        method.on_step_begin(model, step)
        b = layers[0].rank
        assert all(layer.rank == b for layer in layers) and 2 <= b <= 6
        assert b == method.sample_rank(step)  # a function of the step: a resumed run draws the same
        seen.add(b)
        if step == 0:
            with torch.no_grad():
                for layer in layers:
                    layer.lora_B.weight.normal_()
            model(input_ids=ids()).logits.sum().backward()
            a_grad = layers[0].lora_A.weight.grad
            assert a_grad[:b].abs().sum() > 0 and a_grad[b:].abs().sum() == 0
        method.after_optimizer_step(model, step)
        assert layers[0].rank == 6  # full rank between steps (evaluation, saving)
    assert seen == {2, 3, 4, 5, 6}


def test_every_rank_beats_the_base_and_eval_ranks_reports_it(alpaca_file, tmp_path, capsys):
    cfg = run_config(alpaca_file, tmp_path, {"name": "dylora", "r_min": 1, "r_max": 4, "alpha": 8},
                     max_steps=30, lr=5e-3)
    run_dir, _ = api.train(cfg)
    assert cli.main(["eval-ranks", str(run_dir), "--split", "train", "--batches", "4"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and all(f"\n{b:>6}  " in out for b in range(1, 5))
    res = json.loads((run_dir / "ranks.json").read_text())
    assert [r["rank"] for r in res["ranks"]] == [1, 2, 3, 4]
    for r in res["ranks"]:
        assert r["loss"] < res["base"]["loss"] - 0.05, res
    assert (run_dir / "ranks.png").stat().st_size > 1000

    # export at rank 2: a plain LoRA that loads as method lora and equals the run at rank 2
    out_dir = tmp_path / "r2"
    assert cli.main(["export", str(run_dir), "--for", "peft", "--rank", "2", "--out", str(out_dir)]) == 0
    peft_cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert (peft_cfg["peft_type"], peft_cfg["r"]) == ("LORA", 2)
    model, _ = tunesmith.load(run_dir)
    set_rank(model, 2)
    assert json.loads((out_dir / "tunesmith.json").read_text())["method"]["name"] == "lora"
    plain = Lora.load_artifact(tiny(seed=42), out_dir).eval()  # the run's random base (train.seed 42)
    x = ids(vocab=500)
    with torch.no_grad():
        assert rel_err(plain(input_ids=x).logits, model(input_ids=x).logits) < 1e-5


def test_export_rank_matches_truncated_model(tmp_path):
    base = tiny()
    model = tunesmith.apply(copy.deepcopy(base), "dylora", r_max=5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    path = registry.attached(model).save(model, tmp_path, "base")
    cut = DyLora.export_rank(path, 3, tmp_path / "cut")
    plain = Lora.load_artifact(copy.deepcopy(base), cut)
    set_rank(model, 3)
    x = ids()
    with torch.no_grad():
        assert rel_err(plain(input_ids=x).logits, model(input_ids=x).logits) < 1e-6
    with pytest.raises(ConfigError, match="outside 1..5"):
        DyLora.export_rank(path, 6, tmp_path / "bad")


def test_config_errors_and_rank_bounds():
    with pytest.raises(ConfigError, match="r_min"):
        tunesmith.apply(tiny(), "dylora", r_min=5, r_max=3)
    model = tunesmith.apply(tiny(), "dylora", r_max=3)
    with pytest.raises(ConfigError, match="outside 1..3"):
        set_rank(model, 4)


def test_eval_ranks_refuses_other_methods(alpaca_file, tmp_path, capsys):
    import yaml
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config(alpaca_file, tmp_path, {"name": "lora", "r": 2})))
    assert cli.main(["eval-ranks", str(run_dir)]) == 2
    assert "not a dylora run" in capsys.readouterr().err


def test_trainable_count_closed_form():
    model = tunesmith.apply(tiny(), "dylora", r_max=4, target_modules=["k_proj"])
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == dylora_trainable_count(model, 4, registry.attached(model).targets) == 2 * 4 * (64 + 32)
