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
