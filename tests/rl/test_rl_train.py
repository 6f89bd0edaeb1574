"""grpo and rloo end to end on a tiny model: the diagnostics, samples.jsonl, exact resume, the reference
policy, reward errors naming the function and the row, and refusals before the model loads."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from helpers import run_config, write_jsonl
from tunesmith.errors import ConfigError

REWARDS = [{"function": "answer", "weight": 2.0}, {"function": "format", "options": {"pattern": r"\d"}}]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} plus {a}?", "final_answer": str(2 * a)}
                                              for a in range(24)])


def _cfg(path, tmp_path, objective=None, method=None, val_split=0.05, **train):
    t = {"max_steps": 2, "batch_size": 2, "scheduler": "constant", "eval_batches": 1, **train}
    cfg = run_config(path, tmp_path, method or {"name": "lora", "r": 2}, **t)
    cfg["data"]["val_split"] = val_split
    cfg["objective"] = {"name": "grpo", "num_generations": 4, "max_tokens": 6, "rewards": REWARDS,
                        "samples": 2, **(objective or {})}
    return cfg


def test_grpo_logs_every_diagnostic_and_writes_samples(prompts, tmp_path):
    run, summary = tunesmith.train(_cfg(prompts, tmp_path, {"beta": 0.1, "updates": 2}))
    assert summary["status"] == "completed" and (run / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in steps if r["split"] == "train"]
    assert len(train) == 2
    for key in ("loss", "reward", "reward_std", "reward/answer", "reward/answer_std", "reward/format",
                "reward/format_std", "kl", "entropy", "clip_fraction", "completion_length", "truncated",
                "advantage_std", "generation_s", "update_s", "generated_tokens_per_s", "grad_norm"):
        assert key in train[0], key
    assert train[0]["truncated"] == 1.0 and train[0]["completion_length"] == 6.0   # random weights never stop
    assert train[0]["reward"] == pytest.approx(2 * train[0]["reward/answer"] + train[0]["reward/format"])
    evals = [r for r in steps if r["split"] == "eval"]
    assert evals[0]["loss"] == pytest.approx(-evals[0]["reward"])
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 2} and all(len(samples) and "completion" in s for s in samples)
    assert samples[0]["reward"] == pytest.approx(2 * samples[0]["reward/answer"] + samples[0]["reward/format"])


def test_an_online_run_resumes_exactly(prompts, tmp_path):
    obj = {"updates": 2, "beta": 0.05}
    full, _ = tunesmith.train(_cfg(prompts, tmp_path / "a", obj, val_split=0, max_steps=3))
    part, _ = tunesmith.train(_cfg(prompts, tmp_path / "b", obj, val_split=0, max_steps=2, save_every=2))
    resumed, _ = tunesmith.train(None, resume=part, **{"train.max_steps": 3})
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def train_rows(run):
        return [{k: v for k, v in json.loads(x).items() if not k.endswith("_s") and "per_s" not in k}
                for x in (run / "metrics.jsonl").read_text().splitlines() if json.loads(x)["split"] == "train"]
    assert train_rows(full) == train_rows(resumed)


def test_rloo_trains_and_beta_zero_makes_no_reference_pass(prompts, tmp_path, monkeypatch):
    from tunesmith.train.rl import online
    calls = []
    monkeypatch.setattr(online.OnlineObjective, "reference_logps",
                        lambda self, model, chunk: calls.append(1) or torch.zeros_like(chunk["completion_mask"]))
    _, summary = tunesmith.train(_cfg(prompts, tmp_path, {"name": "rloo"}, max_steps=1))
    assert summary["status"] == "completed" and calls == []


def test_reference_is_the_disabled_adapter_or_a_frozen_copy(prompts, tmp_path):
    from tunesmith import config as config_mod
    from tunesmith.train import runner
    for method, copy in (({"name": "lora", "r": 2}, False), ({"name": "full"}, True)):
        cfg = config_mod.load(_cfg(prompts, tmp_path / method["name"], {"beta": 0.1}, method=method))
        _, train_ds, val_ds, _, model, meth, obj = runner.build(cfg, cfg.objective)
        ctx = runner.RunContext(cfg=cfg, train=cfg.train, device=torch.device("cpu"), precision="fp32", pad_id=0,
                                run_dir=tmp_path)
        obj.prepare(model, meth, [train_ds, val_ds], run=ctx)
        assert (obj.reference is not None) == copy
        if copy:
            assert not any(p.requires_grad for p in obj.reference.parameters())


def bad_reward(prompts, completions, **fields):
    if any("7" in p for p in prompts):
        raise ValueError("no sevens")
    return [0.0] * len(completions)


def text_reward(prompts, completions, **fields):
    return ["high"] * len(completions)


@pytest.mark.parametrize("fn,message", [("bad_reward", r"reward bad_reward raised ValueError: no sevens \(row .*p\.jsonl:8"),
                                        ("text_reward", r"reward text_reward returned 'high' for row .*p\.jsonl:\d+")])
def test_a_failing_reward_names_the_function_and_the_row(prompts, tmp_path, fn, message):
    from tunesmith.train.rl import rewards
    fns = rewards.build([type("S", (), {"function": f"{__name__}:{fn}", "weight": 1.0, "options": {}, "name": None})])
    locs = [f"{prompts}:{i + 1}" for i in range(24)]
    texts = [f"What is {a} plus {a}?" for a in range(24)]
    with pytest.raises(ConfigError, match=message):
        rewards.score(fns, texts, ["x"] * 24, [{}] * 24, locs)


def test_builtin_rewards():
    from tunesmith.train.rl import rewards as r
    done = ["She has 5 + 3 = 8 apples.\n#### 8", "The answer is 1,200.", "#### 7", "no number"]
    assert r.answer(None, done, final_answer=["8", "1200", "8", "3"]) == [1.0, 1.0, 0.0, 0.0]
    assert r.answer(None, done[:1], answer=["so 8\n#### 8"]) == [1.0]
    assert r.answer(None, ["<answer>42</answer> 7"], final_answer=["42"], extract=r"<answer>(.*?)</answer>") == [1.0]
    assert r.exact_match(None, [" Paris ", "Rome"], answer=["Paris", "Paris"]) == [1.0, 0.0]
    assert r.format_reward(None, ["x\n#### 3", "3"], pattern=r"####\s*-?\d") == [1.0, 0.0]
    assert r.length_penalty(None, ["a" * 10, "a" * 30], target=20, scale=10) == [0.0, -1.0]
    with pytest.raises(ConfigError, match="unknown reward 'answr'"):
        r.resolve("answr")


@pytest.mark.parametrize("change,message", [
    ({"model": "random:t5"}, "samples completions from a decoder-only model"),
    ({"method": {"name": "fishmask"}}, "prepares its masks from static training batches"),
    ({"train": {"padding_free": True}}, "train.padding_free"),
])
def test_combinations_that_cannot_work_are_refused_before_the_model_loads(prompts, tmp_path, monkeypatch, change,
                                                                          message):
    from tunesmith.train import runner
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = _cfg(prompts, tmp_path, method=change.get("method"))
    if "model" in change:
        cfg["model"]["name_or_path"] = change["model"]
    cfg["train"].update(change.get("train", {}))
    with pytest.raises(ConfigError, match=message):
        tunesmith.train(cfg)


def test_a_run_without_rewards_is_refused_naming_the_field(prompts, tmp_path):
    cfg = _cfg(prompts, tmp_path)
    cfg["objective"]["rewards"] = []
    with pytest.raises(ConfigError, match="rewards"):
        tunesmith.train(cfg)


def test_ppo_with_an_rm_runs_reward_resumes_exactly_with_its_kl_controller_and_value_head(prompts, tmp_path):
    from helpers import preference_rows
    pref = write_jsonl(tmp_path / "pref.jsonl", preference_rows(8))
    rm_cfg = run_config(pref, tmp_path / "rm", {"name": "lora", "r": 2}, max_steps=1)
    rm_cfg["objective"] = {"name": "rm"}
    rm_run, _ = tunesmith.train(rm_cfg)
    obj = {"name": "ppo", "num_generations": 2, "kl_target": 0.5, "kl_horizon": 10, "updates": 2,
           "rewards": [{"function": "reward_model", "options": {"run": str(rm_run)}}]}
    full, _ = tunesmith.train(_cfg(prompts, tmp_path / "a", obj, val_split=0, max_steps=3))
    part, _ = tunesmith.train(_cfg(prompts, tmp_path / "b", obj, val_split=0, max_steps=2, save_every=2))
    resumed, _ = tunesmith.train(None, resume=part, **{"train.max_steps": 3})
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert not any("v_head" in k for k in a)                      # the value head is not part of the adapter
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (full, resumed)]
    train = [[r for r in rs if r["split"] == "train"] for rs in rows]
    coefs = [r["kl_coef"] for r in train[0]]
    assert coefs[0] == 0.05 and coefs[1] != coefs[0]              # adapted towards kl_target
    for x, y in zip(*train):
        assert x["kl_coef"] == y["kl_coef"] and x["reward"] == y["reward"] and x["value_loss"] == y["value_loss"]
    assert "reward/reward_model" in train[0][0]


def _methods():
    from tunesmith.methods import registry
    from tunesmith.methods.registry import Method
    return [n for n, c in registry.all_methods().items()
            if c.prepare is Method.prepare and not c.requires]   # the Fisher methods are refused; qlora needs CUDA


@pytest.mark.parametrize("method", _methods())
def test_one_grpo_step_with_every_method_trains_only_its_parameters(prompts, tmp_path, method):
    from tunesmith import config as config_mod
    from tunesmith.train import runner
    from tunesmith.train.loop import Batches, Loop, LoopState
    from tunesmith.train.optim import build_optimizer, build_scheduler
    cfg = config_mod.load(_cfg(prompts, tmp_path, {"num_generations": 2, "max_tokens": 3, "beta": 0.1},
                               method={"name": method}, val_split=0, batch_size=1))
    tok, train_ds, _, _, model, meth, obj = runner.build(cfg, cfg.objective)
    ctx = runner.RunContext(cfg=cfg, train=cfg.train, device=torch.device("cpu"), precision="fp32",
                            pad_id=tok.pad_token_id, run_dir=tmp_path)
    obj.prepare(model, meth, [train_ds, None], run=ctx)
    meth.on_train_begin(model, 1)
    batches = Batches(train_ds, 1, 0, tok.pad_token_id, torch.device("cpu"), raw=True)
    opt = build_optimizer(meth, model, cfg.train, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loop = Loop(model=model, method=meth, objective=obj, optimizer=opt, scheduler=build_scheduler(opt, cfg.train, 1),
                batches=batches, cfg=cfg.train, device=torch.device("cpu"), precision="fp32", total_steps=1,
                on_eval=lambda s: None, on_checkpoint=lambda s: None, log=lambda r: None,
                train_step=obj.train_step(batches=batches, tokenizer=tok, run=ctx))
    record = loop.step(LoopState())
    assert record["step"] == 1 and "reward" in record
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        if n.endswith(".original"):   # a sparse method's base: its child entries hold the trained values
            keep = torch.ones(p.numel(), dtype=torch.bool)
            keep[model.get_submodule(n[: -len(".original")])[0].indices.long()] = False
            assert torch.equal(p.reshape(-1)[keep], before[n].reshape(-1)[keep]), f"{n} changed outside its mask"
        else:
            assert torch.equal(p, before[n]), f"{n} is frozen and changed"


def test_prompt_rows_keep_their_fields_and_bad_ones_name_file_and_line(tmp_path, tokenizer):
    from tunesmith.data import build_datasets
    from tunesmith.data.config import DataConfig
    from tunesmith.data.errors import DataError
    from tunesmith.train.objectives import build_config
    grpo = build_config({"name": "grpo", "rewards": REWARDS})
    good = write_jsonl(tmp_path / "g.jsonl", [{"question": "2+2?", "final_answer": "4"},
                                              {"question": [{"role": "user", "content": "3+3?"}], "final_answer": "6"}])
    ds, _, report = build_datasets(DataConfig(train=str(good), val_split=0, field_map={"question": "prompt"}),
                                   tokenizer, max_seq_len=64, objective=grpo, seed=0)
    assert report.format == "prompt" and [ex["fields"] for ex in ds.examples] == [{"final_answer": "4"},
                                                                                 {"final_answer": "6"}]
    assert ds.examples[1]["prompt"] == "3+3?" and ds.examples[0]["loc"].endswith("g.jsonl:1")
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "ok"}, {"prompt": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: field 'prompt' must end with a user turn"):
        build_datasets(DataConfig(train=str(bad), val_split=0), tokenizer, max_seq_len=64, objective=grpo, seed=0)
