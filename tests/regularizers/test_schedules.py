"""train.scheduler: each schedule is transformers' own lambda; warmup_ratio; bad options."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import optimization as hf

from tunesmith import config as config_mod
from tunesmith.errors import ConfigError
from tunesmith.train.optim import build_scheduler

TOTAL = 40


def lrs(make):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(TOTAL):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def train(**fields):
    return config_mod.TrainConfig(**fields)


@pytest.mark.parametrize("name,options,oracle", [
    ("cosine_with_restarts", {"num_cycles": 3},
     lambda o: hf.get_cosine_with_hard_restarts_schedule_with_warmup(o, 4, TOTAL, num_cycles=3)),
    ("polynomial", {"power": 2.0, "lr_end": 0.01},
     lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, 4, TOTAL, lr_end=0.01, power=2.0)),
    ("warmup_stable_decay", {"num_decay_steps": 10, "min_lr_ratio": 0.1},
     lambda o: hf.get_wsd_schedule(o, 4, 10, TOTAL, min_lr_ratio=0.1)),
    ("warmup_stable_decay", {}, lambda o: hf.get_wsd_schedule(o, 4, 4, TOTAL)),   # decay over the last 10%
    ("cosine", {}, lambda o: hf.get_cosine_schedule_with_warmup(o, 4, TOTAL)),
])
def test_schedule_matches_transformers(name, options, oracle):
    tc = train(scheduler=name, warmup_steps=4, scheduler_options=options)
    assert lrs(lambda o: build_scheduler(o, tc, TOTAL)) == pytest.approx(lrs(oracle))


def test_warmup_ratio_is_rounded_up():
    tc = train(scheduler="linear", warmup_ratio=0.11)   # ceil(4.4) = 5 warmup steps
    got = lrs(lambda o: build_scheduler(o, tc, TOTAL))
    assert got == pytest.approx(lrs(lambda o: hf.get_linear_schedule_with_warmup(o, math.ceil(0.11 * TOTAL), TOTAL)))
    assert got[5] == pytest.approx(1.0) and got[4] < 1.0


def test_bad_schedule_options_are_refused():
    with pytest.raises(ConfigError, match=r"'power' is not an option of scheduler cosine_with_restarts; valid: num_cycles"):
        build_scheduler(None, train(scheduler="cosine_with_restarts", scheduler_options={"power": 2}), TOTAL)
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio"):
        config_mod.validate({"method": "full", "data": {"train": "x"}, "train": {"warmup_steps": 2, "warmup_ratio": 0.1}})
