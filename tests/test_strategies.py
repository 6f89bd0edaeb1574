"""Strategies: EWC and L2 penalties against their formulas, gradient reversal, the DANN domain loss."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cls_rows, run_config, tiny, write_jsonl

import tunesmith
from tunesmith.data import build_datasets
from tunesmith.errors import ConfigError
from tunesmith.models.loader import ModelConfig, load_tokenizer
from tunesmith.train import objectives, strategies
from tunesmith.train.strategies.configs.ewc import EwcConfig
from tunesmith.train.strategies.configs.l2 import L2Config
from tunesmith.train.strategies.dann import domain_loss, reversal_coefficient
from tunesmith.train.strategies.grl import reverse_gradient


def _ctx(model, tok, objective):
    return strategies.StrategyContext(cfg=None, tokenizer=tok, objective=objective, method=None,
                                      device=torch.device("cpu"), precision="fp32", pad_id=tok.pad_token_id or 0,
                                      total_steps=10, grad_accum=1, max_seq_len=32, seed=0)


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def test_ewc_penalty_is_half_lambda_fisher_weighted_distance(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", cls_rows(12))
    tok = load_tokenizer(ModelConfig(name_or_path="random:bert"))
    model = tiny("bert", task="classification")
    objective = objectives.get("cls")
    ewc = strategies.get(EwcConfig(**{"lambda": 3.0}, data={"train": str(data)}, fisher_examples=5))
    ewc.prepare(model, _ctx(model, tok, objective))

    # the diagonal Fisher by hand: F_i = 1/N Σ_n (∂ log softmax(logits_n)[y_n] / ∂θ_i)², dropout off
    ds, _, _ = build_datasets(ewc_data_cfg(data), tok, max_seq_len=32, objective="cls", seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    theta_star = [p.detach().clone() for p in params]
    model.eval()
    fisher = [torch.zeros_like(p) for p in params]
    for n in range(5):
        ids = torch.tensor([ds[n]["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)[ds[n]["label"]]
        for f, g in zip(fisher, torch.autograd.grad(logp, params)):
            f += g.pow(2) / 5
    for mine, ref in zip(ewc.fisher, fisher):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-10)

    _perturb(model)
    expected = 1.5 * sum((f * (p - a).pow(2)).sum() for f, p, a in zip(fisher, params, theta_star))
    torch.testing.assert_close(ewc.loss(model), expected, rtol=1e-5, atol=1e-12)
    assert float(expected.detach()) > 0


def ewc_data_cfg(path):
    from tunesmith.data import DataConfig
    return DataConfig(train=str(path), val_split=0.0)


def test_l2_penalty_and_its_gradient():
    model = tiny("bert", task="classification")
    l2 = strategies.get(L2Config(**{"lambda": 0.5}))
    l2.prepare(model, None)
    start = [p.detach().clone() for p in model.parameters()]
    _perturb(model)
    params = list(model.parameters())
    pen = l2.loss(model)
    expected = 0.25 * sum((p - a).pow(2).sum() for p, a in zip(params, start))
    torch.testing.assert_close(pen, expected)
    pen.backward()
    torch.testing.assert_close(params[0].grad, 0.5 * (params[0] - start[0]).detach())


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    y = reverse_gradient(x, 0.7)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * w)


def test_dann_domain_loss_and_reversed_encoder_gradient():
    torch.manual_seed(0)
    disc = torch.nn.Linear(4, 2)
    src, tgt = torch.randn(3, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    loss, acc = domain_loss(disc, src, tgt, lam=0.5)
    logits = disc(torch.cat([src, tgt]))
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0, 1, 1]))
    torch.testing.assert_close(loss, ref)
    assert acc == float((logits.argmax(-1) == torch.tensor([0, 0, 0, 1, 1])).float().mean())
    g_feat = torch.autograd.grad(ref, src, retain_graph=True)[0]
    g_disc = torch.autograd.grad(ref, disc.weight)[0]
    loss.backward()
    torch.testing.assert_close(src.grad, -0.5 * g_feat)     # the encoder side is reversed and scaled
    torch.testing.assert_close(disc.weight.grad, g_disc)    # the discriminator learns as usual
    assert reversal_coefficient(1.0, 0.0) == 0.0 and reversal_coefficient(1.0, 1.0) == pytest.approx(
        2 / (1 + torch.exp(torch.tensor(-10.0)).item()) - 1)


def test_dann_run_logs_the_domain_loss_and_trains_the_discriminator(tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", cls_rows(24))
    tgt = write_jsonl(tmp_path / "tgt.jsonl", [{"text": r["text"].upper() + " indeed"} for r in cls_rows(16, seed=2)])
    cfg = run_config(src, tmp_path, {"name": "full"}, model="random:bert", objective="cls", max_steps=3)
    cfg["strategies"] = [{"name": "dann", "target": str(tgt), "hidden": 8}]
    run_dir, summary = tunesmith.train(cfg)
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split": "train"' in l]
    assert all("dann/domain_loss" in r for r in steps) and steps[0]["dann/lambda"] == 0.0
    assert steps[-1]["dann/lambda"] > 0
    bad = {**cfg, "output": {"dir": str(tmp_path / "bad")}, "strategies": [{"name": "dann", "target": str(src),
                                                                           "field_map": {"text": "label"}}]}
    with pytest.raises(ConfigError, match="dann target row needs"):
        tunesmith.train(bad)


def test_dann_run_resumes_to_the_uninterrupted_one(tmp_path):
    """The discriminator and its schedule position are checkpointed: a resumed run matches step for step."""
    import shutil
    src = write_jsonl(tmp_path / "src.jsonl", cls_rows(24))
    tgt = write_jsonl(tmp_path / "tgt.jsonl", [{"text": r["text"].upper() + " indeed"} for r in cls_rows(16, seed=2)])

    def cfg(name):
        c = run_config(src, tmp_path / name, {"name": "full"}, model="random:bert", objective="cls", max_steps=4,
                       save_every=2, lr=1e-2)
        c["strategies"] = [{"name": "dann", "target": str(tgt), "hidden": 8}]
        return c

    def steps(run_dir):
        return [{k: v for k, v in json.loads(l).items() if k in ("loss", "dann/domain_loss", "dann/lambda")}
                for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split": "train"' in l]

    full, _ = tunesmith.train(cfg("a"))
    stopped, _ = tunesmith.train(cfg("b"))
    shutil.rmtree(stopped / "checkpoints" / "step-4")
    assert (stopped / "checkpoints" / "step-2" / "strategies.safetensors").is_file()
    lines = (stopped / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l).get("step", 0) <= 2))
    resumed, _ = tunesmith.train(None, resume=stopped)
    assert steps(resumed) == steps(full) and len(steps(full)) == 4
