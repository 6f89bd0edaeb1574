"""LoRA against HF peft: same weights → same logits and gradients; same training curve; and
adapters that each side saves load on the other with the same logits."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import tunesmith
from helpers import ids, rel_err, run_config, tiny
from tunesmith.models.loader import ModelConfig, load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pair(arch="llama", task="causal_lm", r=4, alpha=8.0, dropout=0.0, bias="none", targets=TARGETS):
    """The same tiny base wrapped by tunesmith and by peft, with identical adapter weights."""
    base = tiny(arch, task=task, seed=3)
    ours = tunesmith.apply(copy.deepcopy(base), "lora", r=r, alpha=alpha, dropout=dropout, bias=bias,
                           target_modules=targets)
    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias,
                                                            target_modules=targets, task_type=task_type))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        ours_params = dict(ours.named_parameters())
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                key = n.removeprefix("base_model.model.").replace(".default", "")
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                ours_params[key].copy_(p)
    return ours, theirs


def test_same_weights_same_logits_and_grads():
    ours, theirs = pair()
    x = ids(seed=1)
    a, b = ours(input_ids=x).logits, theirs(input_ids=x).logits
    assert rel_err(a, b) <= 1e-5
    a.pow(2).mean().backward()
    b.pow(2).mean().backward()
    theirs_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(theirs_grads)
    for n, g in ours_grads.items():
        assert rel_err(g, theirs_grads[n]) <= 1e-5, n


def _train(model, steps=30, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(5)
    data = torch.randint(5, 200, (8, 4, 16), generator=g)  # 8 fixed batches of 4 x 16 tokens
    losses = []
    model.train()
    for step in range(steps):
        x = data[step % len(data)]
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_thirty_steps_match_peft_within_one_percent():
    ours, theirs = pair(dropout=0.1)
    a, b = _train(ours), _train(theirs)
    assert a[-1] < a[0] - 0.05  # it learns
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) / abs(y) <= 0.01, f"step {step}: tunesmith {x} vs peft {y}"


@pytest.mark.parametrize("bias", ["none", "all"])
def test_peft_loads_our_run_and_we_load_peft_adapter(alpaca_file, tmp_path, bias):
    cfg = run_config(alpaca_file, tmp_path, {"name": "lora", "r": 4, "bias": bias}, max_steps=3)
    run_dir, _ = tunesmith.train(cfg)
    ours, _ = tunesmith.load(run_dir, device="cpu")
    base = load_model(ModelConfig(name_or_path="random:llama", device="cpu"), seed=cfg["train"].get("seed", 42))
    theirs = PeftModel.from_pretrained(base, run_dir / "adapter")
    x = ids(seed=2)
    with torch.no_grad():
        assert rel_err(ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5
    # and the other way: an adapter saved by peft loads in tunesmith with the same logits
    theirs.save_pretrained(tmp_path / "peft_saved")
    base_dir = tmp_path / "base"
    load_model(ModelConfig(name_or_path="random:llama", device="cpu"), seed=42).save_pretrained(base_dir)
    tokenizer_src = tunesmith.models.loader.load_tokenizer(ModelConfig(name_or_path="random:llama"))
    tokenizer_src.save_pretrained(base_dir)
    back, _ = tunesmith.load(tmp_path / "peft_saved", base=str(base_dir), device="cpu")
    with torch.no_grad():
        assert rel_err(back(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5


def test_classification_head_saved_as_peft_modules_to_save(cls_file, tmp_path):
    cfg = run_config(cls_file, tmp_path, {"name": "lora", "r": 2}, model="random:bert", max_steps=3)
    run_dir, metrics = tunesmith.train(cfg)
    ours, _ = tunesmith.load(run_dir, device="cpu")
    base = load_model(ModelConfig(name_or_path="random:bert", device="cpu"), task="classification", num_labels=2,
                      seed=42)
    theirs = PeftModel.from_pretrained(base, run_dir / "adapter")
    x = ids(seed=4)
    with torch.no_grad():
        assert rel_err(ours(input_ids=x).logits, theirs(input_ids=x).logits) <= 1e-5
