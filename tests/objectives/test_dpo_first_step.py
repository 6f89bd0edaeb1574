"""At the first step of a DPO run with LoRA the adapter is zero, so the policy is its reference: every
pair's implicit reward margin is 0 and the loss is ln 2, with padded pairs of unequal lengths, eager or
through compiled decoder layers with or without activation checkpointing."""
from __future__ import annotations

import math

import pytest
import torch

import tunesmith
from additive_helpers import small
from tunesmith.config import TrainConfig
from tunesmith.data import collate
from tunesmith.data.collate import to_device
from tunesmith.train.accel import enable_checkpointing
from tunesmith.train.objectives.configs.dpo import DPOConfig
from tunesmith.train.objectives.dpo import DPO


def _pair(g, prompt, chosen, rejected):
    p, c, r = (torch.randint(5, 100, (n,), generator=g).tolist() for n in (prompt, chosen, rejected))
    return {"chosen_input_ids": p + c, "rejected_input_ids": p + r,
            "chosen_labels": [-100] * prompt + c, "rejected_labels": [-100] * prompt + r}


@pytest.mark.parametrize("compiled,checkpointed", [(False, True), pytest.param(True, True, marks=pytest.mark.slow),
                                                   pytest.param(True, False, marks=pytest.mark.slow)])
def test_the_first_dpo_loss_is_ln2_with_padded_pairs(compiled, checkpointed):
    from tunesmith.kernels.compile import compile_decoder_layers
    g = torch.Generator().manual_seed(0)
    pairs = [_pair(g, 7, 9, 4), _pair(g, 3, 5, 12), _pair(g, 10, 2, 6)]
    model = tunesmith.apply(small(), "lora", r=4)
    if checkpointed:
        enable_checkpointing(model)
    if compiled:
        compile_decoder_layers(model)
    objective = DPO(DPOConfig(beta=0.1))
    objective.configure(TrainConfig(compile=compiled, chunked_ce=True))
    objective.prepare(model, None, [], run=None)        # the reference: the adapter disabled
    loss_sum, n, extra = objective.loss(model, to_device(collate(pairs, 1), torch.device("cpu")))
    assert n == 3 and float(loss_sum.detach() / n) == pytest.approx(math.log(2), abs=1e-6)
    margins = [float(v) for k, v in extra.items() if "margin" in k]
    assert margins and all(abs(m) < 1e-5 for m in margins)
