"""Child-tuning (Xu et al. 2021): F's Bernoulli gradient mask and 1/p_F scaling (eq. 3), the entries it
drops staying put under AdamW; D's child network as the top-p_D of a hand-computed Fisher (eq. 4–5)."""
from __future__ import annotations

import copy

import torch

import tunesmith
from tunesmith.api import train
from tunesmith.methods import registry
from tunesmith.methods.child_tuning import ChildTuningD, ChildTuningF
from tunesmith.train import objectives

from helpers import run_config
from selective_helpers import (cls_batches, hand_fisher, logits, mask_set, plain_params, small, state_numel,
                               top_k_set, train_steps)


def _body(model):
    return [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]


def test_mode_selects_the_variant():
    a, b = small(), small()
    tunesmith.apply(a, "child_tuning", mode="F")
    tunesmith.apply(b, "child_tuning")
    assert type(registry.attached(a)) is ChildTuningF and type(registry.attached(b)) is ChildTuningD
    assert registry.attached(b).cfg.p == 0.3


def test_f_mask_keeps_p_and_scales_by_one_over_p():
    model = small()
    tunesmith.apply(model, "child_tuning", mode="F", p=0.3)
    method = registry.attached(model)
    g = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
         for i, (n, p) in enumerate(model.named_parameters())}
    kept_steps, ratio_sum, masks = [], 0, []
    steps = 20
    for step in range(steps):
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        method.before_optimizer_step(model, step)
        kept = total = 0
        for n, p in model.named_parameters():
            if n.startswith("classifier."):
                assert torch.equal(p.grad, g[n])                          # the head is not masked
                continue
            on = p.grad != 0
            # eq. 3: g ⊙ M / p_F — every entry is 0 or exactly g / p_F
            assert torch.equal(p.grad[on], g[n][on] / 0.3)
            kept += int(on.sum())
            total += on.numel()
            ratio_sum = ratio_sum + (p.grad / g[n]).mean() / len(_body(model))
        kept_steps.append(kept / total)
        masks.append(model.bert.embeddings.word_embeddings.weight.grad != 0)
    assert all(abs(f - 0.3) < 0.01 for f in kept_steps)
    assert abs(sum(kept_steps) / steps - 0.3) < 0.003
    assert not torch.equal(masks[0], masks[1])                             # a fresh mask every step
    assert abs(float(ratio_sum) / steps - 1.0) < 0.05                      # unbiased: E[M/p] = 1


def test_f_dropped_entries_do_not_move_under_adamw_momentum_and_decay():
    model = small()
    tunesmith.apply(model, "child_tuning", mode="F", p=0.3)
    method, opt = train_steps(model, cls_batches(), steps=2, weight_decay=0.1)  # momentum everywhere
    obj = objectives.get("cls")
    loss, n, _ = obj.loss(model, cls_batches(seed=5)[0])
    (loss / n).backward()
    method.before_optimizer_step(model, 2)
    pending = list(method._pending)
    opt.step()
    method.after_optimizer_step(model, 2)
    moved = kept = 0
    for p, keep, old in pending:
        assert torch.equal(p[~keep], old[~keep])                            # bit-identical
        moved += int((p[keep] != old[keep]).sum())
        kept += int(keep.sum())
    assert moved > 0.99 * kept


def test_d_mask_is_top_p_of_the_hand_computed_fisher():
    base, batches = small(), cls_batches()
    model = copy.deepcopy(base)
    tunesmith.apply(model, "child_tuning", mode="D", p=0.01)
    method = registry.attached(model)
    method.prepare(model, iter(batches), objectives.get("cls"))
    k = round(0.01 * sum(p.numel() for n, p in base.named_parameters() if not n.startswith("classifier.")))
    assert method.fisher_examples == 12                                    # the whole training set
    assert mask_set(method.masks()) == top_k_set(hand_fisher(base, batches, _body(base)), k)


def test_d_trains_only_the_child_network_with_k_sized_state():
    base, batches = small(), cls_batches()
    model = copy.deepcopy(base)
    tunesmith.apply(model, "child_tuning", mode="D", p=0.02)
    method, opt = train_steps(model, batches, weight_decay=0.1)
    masks, trained, ref = method.masks(), plain_params(model), dict(base.named_parameters())
    k = sum(m.numel() for m in masks.values())
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith("classifier."))
    assert state_numel(opt) == k + head
    moved = 0
    for n in _body(base):
        diff = (trained[n] != ref[n]).reshape(-1)
        inside = torch.zeros_like(diff)
        inside[masks.get(n, torch.empty(0, dtype=torch.long))] = True
        assert not diff[~inside].any(), n
        moved += int(diff[inside].sum())
    assert moved >= 0.99 * k


def test_end_to_end_f_and_d(alpaca_file, cls_file, tmp_path):
    for mode, data, model in (("F", alpaca_file, "random:llama"), ("D", cls_file, "random:bert")):
        run_dir, s = train(run_config(data, tmp_path / mode, {"name": "child_tuning", "mode": mode}, model=model,
                                      max_steps=2))
        loaded, tok = tunesmith.load(run_dir)
        merged, _ = tunesmith.load(tunesmith.merge(run_dir, tmp_path / f"merged-{mode}"))
        b = {"input_ids": torch.randint(5, 1000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
        assert torch.equal(logits(merged, b), logits(loaded, b))
        if mode == "F":
            assert s["trainable_pct"] == 100.0                              # every entry may train
        else:
            assert 29.0 < s["trainable_pct"] < 31.0 and s["optimizer_state_bytes"] < 0.35 * 8 * s["total_params"]
