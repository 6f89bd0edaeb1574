"""Each method's default learning rate: used when train.lr is unset, overridden when it is set."""
from tunesmith import config as config_mod
from tunesmith.methods import registry


def _cfg(method, **train):
    return config_mod.validate({"method": method, "data": {"train": "x.jsonl"}, "train": train})


def test_method_default_used_when_lr_unset():
    cfg, source = config_mod.with_method_lr(_cfg("prompt"))
    assert (cfg.train.lr, source) == (3e-2, "method default")
    assert config_mod.with_method_lr(_cfg({"name": "child_tuning", "mode": "F"}))[0].train.lr == 3e-4
    assert config_mod.with_method_lr(_cfg({"name": "child_tuning", "mode": "D"}))[0].train.lr == 1e-4


def test_explicit_lr_wins():
    cfg, source = config_mod.with_method_lr(_cfg("prompt", lr=5e-4))
    assert (cfg.train.lr, source) == (5e-4, "train.lr")


def test_every_method_declares_a_positive_default():
    for name, cls in registry.all_configs().items():
        lr = cls.model_validate({"name": name}).learning_rate()
        assert 0 < lr < 1, name


# -- the task head's own rate -------------------------------------------------------------------
def test_head_lr_defaults_to_the_methods_head_rate_and_train_head_lr_wins():
    for name, cls in registry.all_configs().items():
        cfg = config_mod.with_method_lr(_cfg(name))[0]
        want = cls.model_validate({"name": name}).head_learning_rate() or cfg.train.lr
        assert cfg.train.head_lr == want, name
    assert config_mod.with_method_lr(_cfg("prefix", head_lr=1e-3))[0].train.head_lr == 1e-3
    set_lr = config_mod.with_method_lr(_cfg("prefix", lr=1e-3))[0].train      # a rate set by hand: one rate
    assert (set_lr.lr, set_lr.head_lr) == (1e-3, 1e-3)
    both = config_mod.with_method_lr(_cfg("prefix", lr=1e-3, head_lr=2e-2))[0].train
    assert (both.lr, both.head_lr) == (1e-3, 2e-2)


def test_head_parameters_get_their_own_groups_at_head_lr():
    import torch
    from helpers import tiny
    from tunesmith.train.optim import build_optimizer
    model = tiny("bert", task="classification")
    method = registry.get("lora")(registry.build_config({"name": "lora"}))
    method.apply(model)
    tc = config_mod.validate({"method": "lora", "data": {"train": "x.jsonl"},
                              "train": {"lr": 1e-3, "head_lr": 2e-2, "weight_decay": 0.1}}).train
    opt = build_optimizer(method, model, tc, torch.device("cpu"))
    name_of = {id(p): n for n, p in model.named_parameters()}
    by_name = {name_of[id(p)]: g for g in opt.param_groups for p in g["params"]}
    head = {n for n in by_name if n.startswith("classifier.")}
    assert head == {"classifier.weight", "classifier.bias"}
    assert all(by_name[n]["lr"] == 2e-2 and by_name[n].get("head") for n in head)
    assert all(g["lr"] == 1e-3 for n, g in by_name.items() if n not in head) and len(by_name) > len(head)
    assert (by_name["classifier.weight"]["weight_decay"], by_name["classifier.bias"]["weight_decay"]) == (0.1, 0.0)
    same = build_optimizer(method, model, tc.model_copy(update={"head_lr": 1e-3}), torch.device("cpu"))
    assert not any(g.get("head") for g in same.param_groups)       # one rate: the groups are left as they are


def test_a_classification_run_reports_its_head_rate(cls_file, tmp_path):
    import json
    import tunesmith
    from helpers import run_config
    data = run_config(cls_file, tmp_path, {"name": "lora", "r": 2}, model="random:bert", max_steps=2,
                      lr=1e-3, head_lr=5e-3, objective="cls")
    data["data"]["format"] = "classification"
    run_dir, _ = tunesmith.train(data)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["lr"], summary["head_lr"]) == (1e-3, 5e-3)
    from tunesmith.train.report import format_summary
    assert "lr 0.001 (train.lr), head lr 0.005" in format_summary({**summary, "run_dir": run_dir})
