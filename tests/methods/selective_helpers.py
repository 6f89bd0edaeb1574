"""Shared helpers of the selective-method tests: small models and batches, a Fisher written out by
hand, a short AdamW training loop through the method hooks, and checks on what changed."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from helpers import tiny
from tunesmith.methods import registry
from tunesmith.train import objectives

VOCAB = 300


def small(arch: str = "bert", task: str = "classification", seed: int = 1, **overrides):
    """A tiny model with a small vocabulary."""
    return tiny(arch, task=task, seed=seed, vocab_size=VOCAB, **overrides)


def cls_batches(n: int = 3, batch: int = 4, length: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, VOCAB, (batch, length), generator=g),
             "attention_mask": torch.ones(batch, length, dtype=torch.long),
             "label": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def lm_batches(n: int = 3, batch: int = 4, length: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(5, VOCAB, (batch, length), generator=g)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


def hand_fisher(model, batches, names: list[str]) -> dict[str, torch.Tensor]:
    """1/N Σ_i (∂ CE(f(x_i), y_i) / ∂w)², one example at a time, in eval mode (classification)."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            logits = model(input_ids=b["input_ids"][i:i + 1], attention_mask=b["attention_mask"][i:i + 1]).logits
            loss = F.cross_entropy(logits.float(), b["label"][i:i + 1], reduction="sum")
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads):
                acc[n] += g * g
            count += 1
    return {n: a / count for n, a in acc.items()}


def top_k_set(scores: dict[str, torch.Tensor], k: int) -> set[tuple[str, int]]:
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    top = torch.topk(flat, k).indices.tolist()
    starts, off = [], 0
    for n in names:
        starts.append((off, n))
        off += scores[n].numel()
    out = set()
    for i in top:
        start, name = max(s for s in starts if s[0] <= i)
        out.add((name, i - start))
    return out


def mask_set(masks: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
    return {(n, int(i)) for n, idx in masks.items() for i in idx.tolist()}


def train_steps(model, batches, steps: int = 6, lr: float = 1e-2, weight_decay: float = 0.1, objective: str = "cls"):
    """prepare + ``steps`` AdamW steps through the method's hooks (as the training loop does)."""
    method = registry.attached(model)
    obj = objectives.get(objective)
    method.prepare(model, iter(batches), obj)
    opt = torch.optim.AdamW(method.param_groups(model, lr, weight_decay), lr=lr)
    model.train()
    for s in range(steps):
        b = batches[s % len(batches)]
        loss, n, _ = obj.loss(model, b)
        (loss / n).backward()
        method.before_optimizer_step(model, s)
        opt.step()
        method.after_optimizer_step(model, s)
        opt.zero_grad(set_to_none=True)
    return method, opt


def plain_params(model) -> dict[str, torch.Tensor]:
    """The model's effective weights by their plain names (parametrized ones evaluated)."""
    out = {}
    for name, module in model.named_modules():
        for attr in list(getattr(module, "parametrizations", {}) or {}):
            out[f"{name}.{attr}" if name else attr] = getattr(module, attr).detach().clone()
    for n, p in model.named_parameters():
        if ".parametrizations." not in n:
            out[n] = p.detach().clone()
    return out


def state_numel(opt, key: str = "exp_avg") -> int:
    return sum(st[key].numel() for st in opt.state.values() if key in st)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
