"""What `tunesmith serve` / `chat` build from their flags: specs parsed with clear errors, a proxy
served by name with proxy-tuning's tokens, a run's own system prompt."""
from __future__ import annotations

import pytest
import torch

import tunesmith
from helpers import alpaca_rows, run_config, write_jsonl
from tunesmith import cli
from tunesmith.errors import ConfigError
from tunesmith.infer import ProxyTuned
from tunesmith.infer.engine import SamplingParams
from tunesmith.infer.proxy import Sampler
from tunesmith.serve.build import build_engine, parse_proxy, split_named, warm_up, warmup_sizes


def test_specs_and_their_errors():
    assert split_named("a=runs/x", "--adapter") == ("a", "runs/x")
    assert parse_proxy("p=e,a") == ("p", "e", "a", 1.0) and parse_proxy("p=e,a,0.5")[3] == 0.5
    for bad in ("noequals", "=x", "a="):
        with pytest.raises(ConfigError, match="expected NAME=PATH"):
            split_named(bad, "--adapter")
    with pytest.raises(ConfigError, match="EXPERT,ANTI_EXPERT"):
        parse_proxy("p=only-one")
    with pytest.raises(ConfigError, match="ALPHA 'x' is not a number"):
        parse_proxy("p=e,a,x")
    with pytest.raises(ConfigError, match="does not exist"):
        build_engine("random:llama", adapters=["a=/no/such/run"], device="cpu")


def test_proxy_and_run_system_prompt(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    cfg = run_config(f, tmp_path, {"name": "prompt", "num_virtual_tokens": 2}, max_steps=1, seed=0)
    cfg["data"]["system_prompt"] = "Answer briefly."
    run, _ = tunesmith.train(cfg)
    engine = build_engine("random:llama", name="base", adapters=[f"pt={run}"],
                          proxies=[f"px={run},random:llama,0.5"], device="cpu")
    assert engine.models() == ["base", "pt", "px"]
    assert engine.routes["pt"].prompter.system_prompt == "Answer briefly."   # the run's own
    assert engine.routes["base"].prompter.system_prompt is None
    base, tok = tunesmith.load("random:llama", device="cpu")
    expert, _ = tunesmith.load(run, device="cpu")
    anti, _ = tunesmith.load("random:llama", device="cpu")
    ids = tok("Add 1 and 2.")["input_ids"]
    got = engine.generate([ids], model="px", params=SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids
    x = torch.tensor([ids])
    want = ProxyTuned(base, expert, anti, 0.5).generate(x, torch.ones_like(x), max_new_tokens=5, sampler=Sampler(),
                                                       eos_token_id=None, pad_token_id=0)
    assert got == want[0, len(ids):].tolist()


def test_serve_flags_are_checked_before_loading(capsys):
    assert cli.main(["serve", "random:llama", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


def test_warmup_sizes_and_their_errors():
    assert warmup_sizes("all", 32) == [1, 2, 4, 8, 16, 32]
    assert warmup_sizes("all", 6) == [1, 2, 4, 6]                 # the last bucket is max_batch itself
    assert warmup_sizes("8,1,8", 32) == [1, 8]
    with pytest.raises(ConfigError, match="expected 'all' or batch sizes"):
        warmup_sizes("big", 32)
    with pytest.raises(ConfigError, match=r"must be 1\.\.4 \(--max-batch\), got 8"):
        warmup_sizes("1,8", 4)


def test_warm_up_runs_every_batch_bucket_on_the_base_and_with_an_adapter_row():
    """Every size decodes once with all rows on the base and once with a row on the per-row adapter;
    the engine is idle afterwards and serves as before."""
    from additive_helpers import small
    from tunesmith.infer.engine import Engine
    model = small()
    engine = Engine(model, fast=True, max_batch=4)
    g = torch.Generator().manual_seed(0)
    engine.add_lora("a", {name: (torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g),
                                 1.0)
                          for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))})
    runner = engine.routes["base"].lane.runner
    seen, step = [], runner.step_fn
    runner.step_fn = lambda ids, pos, valid: (seen.append((ids.shape[0], engine.table.rows is not None)),
                                              step(ids, pos, valid))[1]
    want = engine.generate([[5, 6, 7]], model="a", params=SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
    seen.clear()
    assert warm_up(engine, [1, 2, 4]) >= 0
    assert set(seen) == {(n, rows) for n in (1, 2, 4) for rows in (False, True)}
    assert engine.load == {"running": 0, "waiting": 0}
    got = engine.generate([[5, 6, 7]], model="a", params=SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
    assert got == want


def test_serve_checks_warmup_before_loading(capsys):
    assert cli.main(["serve", "random:llama", "--max-batch", "4", "--warmup", "8"]) == 2
    assert "--warmup '8': a batch size must be 1..4" in capsys.readouterr().err
