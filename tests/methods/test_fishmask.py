"""FishMask (Sung et al. 2021): the mask is the top-k of a hand-computed empirical Fisher; only those
entries move; AdamW state is k-sized; the sparse delta reproduces the trained model exactly."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from tunesmith.api import train
from tunesmith.errors import ConfigError
from tunesmith.methods import delta, registry
from tunesmith.methods._fisher import split_examples
from tunesmith.train import objectives

from helpers import run_config, tiny
from selective_helpers import (cls_batches, hand_fisher, logits, mask_set, plain_params, small, state_numel,
                               top_k_set, train_steps)


def _base_names(model):
    return [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]


def test_mask_is_top_k_of_the_hand_computed_fisher():
    base, batches = small(), cls_batches()
    model = copy.deepcopy(base)
    tunesmith.apply(model, "fishmask", count=2000)
    method = registry.attached(model)
    method.prepare(model, iter(batches), objectives.get("cls"))
    expected = top_k_set(hand_fisher(base, batches, _base_names(base)), 2000)
    got = mask_set(method.masks())
    assert len(got) == 2000 and method.fisher_examples == 12
    assert got == expected


def test_fisher_samples_caps_the_examples_and_budget_defaults():
    model = small()
    tunesmith.apply(model, "fishmask", fisher_samples=5)
    method = registry.attached(model)
    method.prepare(model, iter(cls_batches()), objectives.get("cls"))
    assert method.fisher_examples == 5
    total = sum(p.numel() for n, p in small().named_parameters() if not n.startswith("classifier."))
    assert sum(m.numel() for m in method.masks().values()) == round(0.005 * total)


def test_split_examples_drops_padding():
    b = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
         "label": torch.tensor([0, 1])}
    exs = list(split_examples(b))
    assert exs[1]["input_ids"].tolist() == [[8, 9]] and exs[1]["label"].tolist() == [1]


def test_only_masked_entries_move_and_optimizer_state_is_k_sized(tmp_path):
    base, batches = small(), cls_batches()
    model = copy.deepcopy(base)
    tunesmith.apply(model, "fishmask", count=3000)
    method, opt = train_steps(model, batches)
    masks = method.masks()
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith("classifier."))
    assert state_numel(opt, "exp_avg") == state_numel(opt, "exp_avg_sq") == 3000 + head
    trained, ref = plain_params(model), dict(base.named_parameters())
    moved = 0
    for n in _base_names(base):
        diff = (trained[n] != ref[n]).reshape(-1)
        inside = torch.zeros_like(diff)
        inside[masks.get(n, torch.empty(0, dtype=torch.long))] = True
        assert not diff[~inside].any(), f"{n}: an entry outside the mask moved"
        moved += int(diff[inside].sum())
    assert moved >= 0.99 * 3000
    # sparse delta: base + delta == trained, bit for bit; merged == both
    path = method.save(model, tmp_path, "random:bert")
    cfg = delta.read_config(path)
    assert cfg["stats"]["sparse_tensors"] >= 1 and "classifier.weight" in cfg["tensors"]
    loaded = registry.get("fishmask").load_artifact(copy.deepcopy(base), path)
    merged = method.merge(model)
    for n, p in loaded.named_parameters():
        assert torch.equal(p, trained[n]) and torch.equal(dict(merged.named_parameters())[n], p), n
    assert torch.equal(logits(loaded, batches[0]), logits(merged, batches[0]))


def test_checkpoint_state_restores_the_mask_into_the_same_parameters():
    model = small()
    tunesmith.apply(model, "fishmask", count=500)
    method, opt = train_steps(model, cls_batches(), steps=2)
    state = {k: v.clone() for k, v in method.trainable_state(model).items()}
    other = small()
    tunesmith.apply(other, "fishmask", count=500)            # a different (random) placeholder mask
    m2 = registry.attached(other)
    objs = [id(p) for p in other.parameters() if p.requires_grad]
    m2.load_trainable_state(other, state)
    assert [id(p) for p in other.parameters() if p.requires_grad] == objs  # the optimizer's objects
    assert mask_set(m2.masks()) == mask_set(method.masks())
    b = cls_batches()[0]
    assert torch.equal(logits(other, b), logits(model, b))


def test_after_optimizer_step_writes_updates_that_bypass_the_version_counter():
    model = small()
    tunesmith.apply(model, "fishmask", count=500)
    method = registry.attached(model)
    b = cls_batches()[0]
    before = logits(model, b)
    for mv, _ in method.slots.values():
        mv.values.data.add_(0.5)            # like a fused optimizer step: no version bump
    method.after_optimizer_step(model, 0)
    after = logits(model, b)
    assert not torch.equal(before, after)
    for n, t in method.base_tensors().items():
        mv = method.slots[n][0]
        assert torch.equal(t.reshape(-1)[mv.indices.long()], mv.values)


def test_tied_weights_get_the_gradient_of_both_uses():
    base = small("llama", "causal_lm", tie_word_embeddings=True)
    model = copy.deepcopy(base)
    tunesmith.apply(model, "fishmask", fraction=0.05)
    mv = registry.attached(model).slots["model.embed_tokens.weight"][0]
    assert model.lm_head.parametrizations.weight[0] is mv                 # one set of values for both uses
    x = torch.randint(5, 300, (2, 8))
    model(input_ids=x).logits.pow(2).mean().backward()
    ref = copy.deepcopy(base)
    ref.model.embed_tokens.weight.requires_grad_(True)
    ref(input_ids=x).logits.pow(2).mean().backward()
    dense = ref.model.embed_tokens.weight.grad.reshape(-1)
    assert torch.allclose(mv.values.grad, dense[mv.indices.long()], rtol=1e-5, atol=1e-8)


def test_resumed_run_equals_an_uninterrupted_one(cls_file, tmp_path):
    method = {"name": "fishmask", "fraction": 0.01, "fisher_samples": 8}
    kw = {"model": "random:bert", "scheduler": "constant"}
    straight, _ = train(run_config(cls_file, tmp_path / "a", method, max_steps=4, **kw))
    first, _ = train(run_config(cls_file, tmp_path / "b", method, max_steps=2, **kw))
    resumed, _ = train(None, resume=first, **{"train.max_steps": 4})
    a = load_file(str(straight / "delta" / delta.WEIGHTS_NAME))
    b = load_file(str(resumed / "delta" / delta.WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_budget_validation():
    with pytest.raises(ConfigError, match="fraction.*count.*not both"):
        tunesmith.apply(small(), "fishmask", fraction=0.01, count=10)
    with pytest.raises(ConfigError, match="fraction"):
        tunesmith.apply(small(), "fishmask", fraction=1.5)


def test_end_to_end_train_load_merge(cls_file, tmp_path):
    run_dir, s = train(run_config(cls_file, tmp_path, {"name": "fishmask", "fraction": 0.01}, model="random:bert",
                                  max_steps=3))
    base = tiny("bert", task="classification", seed=42)
    n_base = sum(p.numel() for n, p in base.named_parameters() if not n.startswith("classifier."))
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith("classifier."))
    k = round(0.01 * n_base)
    assert s["trainable_params"] == k + head and s["total_params"] == n_base + head
    assert 8 * (k + head) <= s["optimizer_state_bytes"] <= 8 * (k + head) + 4096   # two fp32 moments
    assert s["artifact_bytes"] < 0.03 * 4 * n_base
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    state = load_file(str(ckpt / "trainable.safetensors"))
    model, _ = tunesmith.load(run_dir)
    loaded = dict(model.named_parameters())
    for n, p in base.named_parameters():
        if n.startswith("classifier."):
            continue
        outside = torch.ones(p.numel(), dtype=torch.bool)
        outside[state[f"{n}@indices"].long()] = False
        assert torch.equal(loaded[n].reshape(-1)[outside], p.reshape(-1)[outside]), n
    out = tunesmith.merge(run_dir, tmp_path / "merged")
    merged, _ = tunesmith.load(out)
    b = {"input_ids": torch.randint(5, 1000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    assert torch.equal(logits(merged, b), logits(model, b))
    assert json.loads((run_dir / "delta" / "delta_config.json").read_text())["method"]["name"] == "fishmask"
