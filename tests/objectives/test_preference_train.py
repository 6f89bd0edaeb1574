"""Preference objectives end to end on tiny models: the reference policy, per-sequence log-probs, a saved
reward head scored again, and the objective axis of the invariant matrix (every method, rm and dpo)."""
from __future__ import annotations

import json

import pytest
import torch

import tunesmith
from helpers import OnDevice, preference_rows, rel_err, run_config, write_jsonl
from tunesmith import cli
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.train.objectives._logps import chunked_logps, logits_logps
from tunesmith.train.objectives._preference import Reference, pair_rows
from tunesmith.train.loop import Batches


@pytest.fixture
def pref_file(tmp_path):
    return write_jsonl(tmp_path / "pref.jsonl", preference_rows(24))


def _cfg(path, tmp_path, method, objective, **train):
    cfg = run_config(path, tmp_path, method, **train)
    cfg["objective"] = objective
    return cfg


def _built(pref_file, tmp_path, method, objective="dpo"):
    from tunesmith import config as config_mod
    from tunesmith.train import runner
    cfg = config_mod.load(_cfg(pref_file, tmp_path, method, {"name": objective}))
    tok, train_ds, _, _, model, meth, obj = runner.build(cfg, objective)
    batch = Batches(train_ds, 4, 0, tok.pad_token_id, torch.device("cpu")).get(0)
    return model, obj, batch


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "lora", "r": 2}, {"name": "full"}])   # a frozen head; a trained one
def test_chunked_log_probs_equal_the_full_logits(pref_file, tmp_path, monkeypatch, method):
    from tunesmith.train.objectives import _logps
    model, _, batch = _built(pref_file, tmp_path, method)
    monkeypatch.setattr(_logps, "CHUNK_ELEMENTS", model.get_output_embeddings().weight.shape[0] * 16)  # chunks
    rows, b = pair_rows(batch)
    grads = []
    for fn in (logits_logps, chunked_logps):
        sums, counts = fn(model, rows, 2 * b)
        (sums * torch.arange(1, 2 * b + 1)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
        if fn is logits_logps:
            want = sums.detach(), counts
    torch.testing.assert_close(sums.detach(), want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, want[1])
    for a, g in zip(*grads):
        assert rel_err(g, a) < 1e-4


@pytest.mark.parametrize("packed", [False, True])
def test_log_probs_find_their_positions_on_the_host(pref_file, tmp_path, packed):
    """With the batch's CPU copy, the labelled positions and each sequence's count come from the host:
    no device tensor is read (on CUDA that would wait for the GPU), and the sums are those found on the
    device."""
    from tunesmith.data.collate import HOST, to_device
    from tunesmith.data.packing import collate_packed_pairs
    model, obj, batch = _built(pref_file, tmp_path, {"name": "lora", "r": 2})
    if packed:
        batch = to_device(collate_packed_pairs(_examples(pref_file, tmp_path)[:4]),
                          torch.device("cpu"))
    rows, b = pair_rows(batch)
    assert set(rows[HOST]) == {"labels", "sequence"}
    plain = {k: v for k, v in rows.items() if k != HOST}
    guarded = {**rows, "labels": rows["labels"].as_subclass(OnDevice),
               "sequence": rows["sequence"].as_subclass(OnDevice)}
    with torch.no_grad():
        want = chunked_logps(model, plain, 2 * b)
        got = chunked_logps(model, guarded, 2 * b)
        with pytest.raises(AssertionError, match="read a device tensor"):
            chunked_logps(model, {k: v for k, v in guarded.items() if k != HOST}, 2 * b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.as_subclass(torch.Tensor), w)


def _examples(pref_file, tmp_path):
    from tunesmith import config as config_mod
    from tunesmith.train import runner
    cfg = config_mod.load(_cfg(pref_file, tmp_path, {"name": "lora", "r": 2}, {"name": "dpo"}))
    return runner.build(cfg, "dpo")[1].examples


def test_the_reference_of_an_adapter_is_the_same_weights_disabled_and_of_full_a_frozen_copy(pref_file, tmp_path):
    model, obj, batch = _built(pref_file, tmp_path, {"name": "lora", "r": 2})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()                                           # the policy moved away from the base
    ref = Reference(model, logits_logps)
    assert ref.kind == "disabled" and ref.copy is None
    rows, b = pair_rows(batch)
    from tunesmith.methods.inject import disable_adapters
    with torch.no_grad(), disable_adapters(model):
        base = logits_logps(model, rows, 2 * b)[0]
    torch.testing.assert_close(ref(model, rows, 2 * b), base)
    assert not torch.allclose(logits_logps(model, rows, 2 * b)[0].detach(), base)
    full, _, _ = _built(pref_file, tmp_path / "f", {"name": "full"})
    ref = Reference(full, logits_logps)
    assert ref.kind == "copy" and not any(p.requires_grad for p in ref.copy.parameters())


def test_a_reward_model_is_saved_with_its_head_and_scored_again(pref_file, tmp_path, capsys):
    val = write_jsonl(tmp_path / "val.jsonl", preference_rows(6, seed=1))
    cfg = _cfg(pref_file, tmp_path, {"name": "lora", "r": 2}, {"name": "rm"}, max_steps=3)
    cfg["data"]["validation"] = str(val)
    run_dir, m = tunesmith.train(cfg)
    last = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][-2]
    assert last["split"] == "eval" and {"accuracy", "margin", "rewards/chosen"} <= set(last)
    rows = preference_rows(6, seed=1)
    chosen = tunesmith.score(run_dir, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = tunesmith.score(run_dir, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(rows)
    assert abs(margin - last["margin"]) < 1e-4                          # the trained head came back
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", str(run_dir), "--data", str(val), "--out", str(out)]) == 0
    scored = [json.loads(l) for l in out.read_text().splitlines()]
    assert [round(r["chosen_score"], 5) for r in scored] == [round(c, 5) for c in chosen]


def test_a_run_that_cannot_work_is_refused_before_the_model_loads(pref_file, tmp_path):
    with pytest.raises(ConfigError, match="objective.name: dpo trains a causal LM's log-probabilities, and the "
                                          "model is an encoder"):
        tunesmith.train(_cfg(pref_file, tmp_path, {"name": "lora"}, {"name": "dpo"}, model="random:bert"))
    with pytest.raises(ConfigError, match=r"train.padding_free: .*not 'rm'"):
        tunesmith.train(_cfg(pref_file, tmp_path, {"name": "lora"}, {"name": "rm"}, padding_free=True))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "rm"])
@pytest.mark.parametrize("method", list(registry.all_configs()))
def test_every_method_takes_a_preference_step_and_round_trips(method, objective, pref_file, tmp_path):
    cls = registry.get(method)
    if cls.requires and not cls.requires_met() if hasattr(cls, "requires_met") else cls.requires:
        pytest.skip(f"{method} needs {cls.requires}")
    options = dict(cls.invariant_cases[0].get("options", {})) if cls.invariant_cases else {}
    cfg = _cfg(pref_file, tmp_path, {"name": method, **options}, {"name": objective}, max_steps=1, batch_size=2)
    run_dir, m = tunesmith.train(cfg)
    assert m["status"] == "completed" and m["trainable_params"] > 0
    model, tok = tunesmith.load(run_dir)
    ids = tok("Say red twice. red red", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()


def _train_records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


@pytest.mark.slow
def test_padding_free_pairs_equal_the_padded_step(pref_file, tmp_path):
    """One DPO step over all pairs: packed into one row (chosen and rejected as documents, document-masked
    attention) or padded into one batch: the same loss, metrics and update."""
    common = dict(max_steps=1, lr=1e-2, scheduler="constant")
    objective = {"name": "dpo", "rpo_alpha": 0.5}
    padded, mp = tunesmith.train(_cfg(pref_file, tmp_path / "a", {"name": "lora", "r": 2}, objective,
                                      batch_size=64, **common))
    packed, mk = tunesmith.train(_cfg(pref_file, tmp_path / "b", {"name": "lora", "r": 2}, objective, batch_size=1,
                                      padding_free=True, max_tokens_per_batch=100_000, **common))
    (lp,), (lk,) = _train_records(padded), _train_records(packed)
    for key in ("loss", "logps/chosen", "logps/rejected", "accuracy"):
        assert abs(lk[key] - lp[key]) <= 1e-5 * max(1.0, abs(lp[key])), key
    assert abs(mk["eval_loss_after"] - mp["eval_loss_after"]) <= 1e-4
    assert mk["train_tokens"] == mp["train_tokens"]


def test_kto_trains_on_unpaired_rows(tmp_path):
    from helpers import kto_rows
    f = write_jsonl(tmp_path / "kto.jsonl", kto_rows())
    run_dir, m = tunesmith.train(run_config(f, tmp_path, {"name": "lora", "r": 2}, max_steps=2))   # format kto -> kto
    first = _train_records(run_dir)[0]
    assert m["status"] == "completed" and abs(first["loss"] - 0.5) < 1e-6 and first["kl"] == 0.0  # policy = ref


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "x.jsonl:2: fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "x.jsonl:2: field 'chosen' is empty"),
    ({"chosen": "a", "rejected": "b"}, "x.jsonl:2: missing field 'prompt'"),
    ({"prompt": "p", "completion": "", "label": True}, "x.jsonl:2: field 'completion' is empty"),
    ({"completion": "c", "label": True, "prompt": None}, "x.jsonl:2: missing field 'prompt'"),
    ({"prompt": "p", "completion": "c", "label": "yes"}, "x.jsonl:2: field 'label' has type str (value 'yes'), "
                                                         "expected a boolean"),
])
def test_bad_preference_rows_name_file_and_line(row, message, tmp_path):
    from tunesmith.data import DataConfig, DataError, build_datasets
    from tunesmith.models.loader import ModelConfig, load_tokenizer
    good = {"prompt": "p", "chosen": "a", "rejected": "b"} if "chosen" in row else {"prompt": "p", "completion": "c",
                                                                                     "label": False}
    f = write_jsonl(tmp_path / "x.jsonl", [good, row])
    fmt = "preference" if "chosen" in row else "kto"
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_datasets(DataConfig(train=str(f), format=fmt), load_tokenizer(ModelConfig(name_or_path="random:llama")),
                       max_seq_len=32, objective="dpo" if fmt == "preference" else "kto", seed=0)
