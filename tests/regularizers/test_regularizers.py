"""Each regulariser against its formula written out, on tiny random models."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import cls_rows, run_config, tiny, write_jsonl

import tunesmith
from tunesmith import config as config_mod
from tunesmith.errors import ConfigError
from tunesmith.train import regularizers
from tunesmith.train.optim import build_optimizer
from tunesmith.methods import registry


def train_cfg(**regularize):
    return config_mod.validate({"method": "full", "data": {"train": "x.jsonl"},
                                "train": {"lr": 1e-3, "weight_decay": 0.1, "regularize": regularize}}).train


def lm_batch(vocab: int, b: int = 2, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100                       # a masked prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def cls_batch(vocab: int, b: int = 4, t: int = 6):
    ids = torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "label": torch.tensor([0, 1, 1, 0])}


def objective(name):
    from tunesmith.train import objectives
    obj = objectives.get(objectives.build_config(name))
    obj.configure(config_mod.TrainConfig(chunked_ce=False))
    return obj


# -- NEFTune ----------------------------------------------------------------------------------------------

def test_neftune_adds_uniform_noise_of_scale_alpha_over_sqrt_L_d_in_training_only():
    model = tiny("llama")
    embed = model.get_input_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    clean = embed(ids).detach()
    alpha = 5.0
    train_cfg(neftune={"alpha": alpha}).regularize["neftune"].apply(model)
    model.train()
    torch.manual_seed(7)
    noisy = embed(ids).detach()
    L, d = ids.shape[1], clean.shape[-1]
    bound = alpha / math.sqrt(L * d)
    noise = noisy - clean
    assert noise.abs().max() <= bound + 1e-6 and noise.abs().max() > 0.9 * bound
    assert abs(noise.std().item() - bound / math.sqrt(3)) < 0.05 * bound     # Uniform(-b, b) has std b/sqrt(3)
    assert abs(noise.mean().item()) < 0.05 * bound
    # the same draw as transformers' own NEFTune hook
    from transformers.integrations.neftune import neftune_post_forward_hook
    embed.neftune_noise_alpha = alpha
    torch.manual_seed(7)
    assert torch.allclose(neftune_post_forward_hook(embed, (ids,), clean), noisy, atol=1e-6)
    model.eval()
    assert torch.equal(embed(ids), clean)


# -- label smoothing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["cls", "sft"])
def test_label_smoothing_equals_the_formula_and_torch(task):
    eps = 0.2
    if task == "cls":
        model, batch = tiny("bert", task="classification"), None
        batch = cls_batch(model.config.vocab_size)
    else:
        model = tiny("llama")
        batch = lm_batch(model.config.vocab_size)
    model.eval()
    obj = objective(task)
    smoothed = train_cfg(label_smoothing={"epsilon": eps}).regularize["label_smoothing"].wrap_loss(obj.loss)
    loss, n, _ = smoothed(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if task == "cls":
        z, y = logits, batch["label"]
    else:
        z, y = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
        z, y = z[y != -100], y[y != -100]
    logp = torch.log_softmax(z, -1)
    K = z.shape[-1]
    formula = sum((1 - eps) * -logp[i, y[i]] + eps * -logp[i].sum() / K for i in range(len(y)))
    assert n == len(y)
    assert torch.allclose(loss, formula, rtol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(z, y, label_smoothing=eps, reduction="sum"), rtol=1e-5)


# -- R-Drop -----------------------------------------------------------------------------------------------

def test_rdrop_is_the_mean_ce_plus_alpha_symmetric_kl_of_two_dropout_passes():
    model = tiny("bert", task="classification", hidden_dropout_prob=0.3)
    model.train()
    batch = cls_batch(model.config.vocab_size)
    alpha = 0.7
    wrapped = train_cfg(rdrop={"alpha": alpha}).regularize["rdrop"].wrap_loss(objective("cls").loss)
    torch.manual_seed(3)
    loss, n, _ = wrapped(model, batch)
    torch.manual_seed(3)
    z1 = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z2 = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(z1, z2)          # dropout made the passes differ
    y = batch["label"]
    ce = 0.5 * (F.cross_entropy(z1, y, reduction="sum") + F.cross_entropy(z2, y, reduction="sum"))
    lp, lq = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
    kl = 0.5 * (F.kl_div(lq, lp, log_target=True, reduction="sum") + F.kl_div(lp, lq, log_target=True, reduction="sum"))
    assert n == 4 and torch.allclose(loss, ce + alpha * kl, rtol=1e-5)
    model.eval()                                # without dropout the KL vanishes
    loss_eval, _, _ = wrapped(model, batch)
    assert torch.allclose(loss_eval, objective("cls").loss(model, batch)[0], rtol=1e-6)


# -- dropout, weight-decay groups, layer-wise learning rates --------------------------------------------

def test_dropout_override_sets_every_rate_and_the_config():
    model = tiny("bert", task="classification")
    train_cfg(dropout={"p": 0.25, "attention": 0.05}).regularize["dropout"].apply(model)
    rates = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert rates and all(p == (0.05 if "attention.self" in n else 0.25) for n, p in rates.items())
    assert model.config.hidden_dropout_prob == 0.25 and model.config.attention_probs_dropout_prob == 0.05
    llama = tiny("llama")                   # decoder attention passes a float rate to its kernel
    train_cfg(dropout={"p": 0.2, "attention": 0.1}).regularize["dropout"].apply(llama)
    rates = [m.attention_dropout for m in llama.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert rates and set(rates) == {0.1} and llama.config.attention_dropout == 0.1


def groups_of(model, tc):
    method = registry.get("full")(registry.build_config({"name": "full"}))
    method.apply(model)
    opt = build_optimizer(method, model, tc, torch.device("cpu"))
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: g for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_weight_decay_groups_spare_norms_and_biases(arch):
    model = tiny(arch, task="classification" if arch == "bert" else "causal_lm")
    spared = {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if "Norm" in type(m).__name__
              for pn, _ in m.named_parameters(recurse=False)}
    spared |= {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    by_name = groups_of(model, train_cfg(weight_decay={}))
    assert spared and len(by_name) == len(list(model.parameters()))
    for n, g in by_name.items():
        assert g["weight_decay"] == (0.0 if n in spared else 0.1), n
    embed = next(n for n in by_name if "embed" in n and n.endswith("weight") and "Norm" not in n)
    assert by_name[embed]["weight_decay"] == 0.1
    model2 = tiny(arch, task="classification" if arch == "bert" else "causal_lm")
    assert groups_of(model2, train_cfg(weight_decay={"embeddings": False}))[embed]["weight_decay"] == 0.0


def test_layer_decay_gives_lr_times_decay_to_the_depth():
    model = tiny("bert", task="classification")
    L = model.config.num_hidden_layers
    decay, lr = 0.5, 1e-3
    by_name = groups_of(model, train_cfg(layer_decay={"decay": decay}))
    for n, g in by_name.items():
        if ".layer." in n:
            depth = L - int(n.split(".layer.")[1].split(".")[0])
        elif "embeddings" in n:
            depth = L + 1
        else:                                    # pooler, classifier
            depth = 0
        assert g["lr"] == pytest.approx(lr * decay ** depth), n
    assert sorted({round(g["lr"] / lr, 9) for g in by_name.values()}) == sorted(round(decay ** k, 9) for k in range(L + 2))


def test_layer_decay_and_weight_decay_compose():
    model = tiny("llama")
    by_name = groups_of(model, train_cfg(layer_decay={"decay": 0.5}, weight_decay={}))
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0 and by_name["model.norm.weight"]["lr"] == 1e-3
    q = "model.layers.0.self_attn.q_proj.weight"
    assert by_name[q]["weight_decay"] == 0.1 and by_name[q]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)


# -- config and end to end ---------------------------------------------------------------------------------

def test_bad_regularizer_config_names_the_field():
    with pytest.raises(ConfigError, match=r"train.regularize.*'neftun'.*did you mean 'neftune'"):
        train_cfg(neftun={})
    with pytest.raises(ConfigError, match=r"label_smoothing.epsilon.*less than 1"):
        train_cfg(label_smoothing={"epsilon": 1.5})
    tc = train_cfg(rdrop={})
    with pytest.raises(ConfigError, match="rdrop works with the cls, sft and pt objectives"):
        regularizers.check(tc, __import__("tunesmith.train.objectives", fromlist=["x"]).build_config("dpo"))
    tc = config_mod.TrainConfig(chunked_ce=True, regularize={"label_smoothing": {}})
    with pytest.raises(ConfigError, match="chunked_ce"):
        regularizers.check(tc, __import__("tunesmith.train.objectives", fromlist=["x"]).build_config("sft"))


def test_a_run_with_every_regularizer(tmp_path):
    data = write_jsonl(tmp_path / "cls.jsonl", cls_rows(24))
    cfg = run_config(data, tmp_path, {"name": "lora", "r": 2}, model="random:bert", objective="cls",
                     max_steps=3, max_seq_len=16, regularize={
                         "neftune": {"alpha": 5}, "label_smoothing": {"epsilon": 0.1}, "rdrop": {"alpha": 0.5},
                         "dropout": {"p": 0.2}, "weight_decay": {}, "layer_decay": {"decay": 0.9}})
    run_dir, summary = tunesmith.train(cfg)
    assert summary["status"] == "completed" and summary["steps"] == 3
    saved = config_mod.load(run_dir / "config.yaml").train.regularize
    assert sorted(saved) == ["dropout", "label_smoothing", "layer_decay", "neftune", "rdrop", "weight_decay"]
