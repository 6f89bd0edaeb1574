"""Each preference loss against TRL 1.16's implementation on the same per-sequence log-probs (TRL as a
test-only oracle, driven through its own loss code with the model's outputs given), and the paper's formula
where TRL has none (conservative DPO)."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunesmith.train.objectives.dpo import dpo_loss
from tunesmith.train.objectives.orpo import orpo_loss
from tunesmith.train.objectives.rm import reward_loss
from tunesmith.train.objectives.simpo import simpo_loss

trl = pytest.importorskip("trl")
B, T = 4, 9


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def unwrap_model(self, m):
        return m


def _trainer(**kw):
    base = dict(model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
                ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False,
                label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                _tp_size=1)
    return SimpleNamespace(**{**base, **kw})


def _sequences(seed=0):
    """Per-token log-probs of 2B sequences (chosen then rejected) with completion masks of varied length."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[i, start:end] = 1
    token = -torch.rand(2 * B, T - 1, generator=g) * 3 * mask[:, 1:]        # (2B, T-1), 0 off the completion
    ref = -torch.rand(2 * B, generator=g) * 10
    return token, mask, ref


def _trl_dpo(loss_types, weights, beta, eps, token, mask, ref):
    out = SimpleNamespace(log_probs=token, entropy=torch.zeros_like(token), mean_logits=torch.zeros_like(token),
                          is_top1=torch.zeros_like(token, dtype=torch.bool))
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    fake = _trainer(loss_types=loss_types, loss_weights=weights, beta=beta, label_smoothing=eps)
    return trl.DPOTrainer._compute_loss(fake, lambda **_: out, inputs, False)


@pytest.mark.parametrize("loss_type, beta, eps, rpo", [
    ("sigmoid", 0.1, 0.0, None), ("sigmoid", 0.5, 0.0, 0.7), ("ipo", 0.1, 0.0, None), ("ipo", 0.9, 0.0, None),
    ("hinge", 0.1, 0.0, None), ("hinge", 2.0, 0.0, None), ("robust", 0.1, 0.2, None), ("robust", 0.3, 0.0, None),
])
def test_dpo_losses_equal_trl(loss_type, beta, eps, rpo):
    token, mask, ref = _sequences()
    sums, counts = token.sum(1), mask[:, 1:].sum(1).float()
    types, weights = ([loss_type, "sft"], [1.0, rpo]) if rpo else ([loss_type], [1.0])
    want = _trl_dpo(types, weights, beta, eps, token, mask, ref)
    losses, rc, rr = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type,
                              label_smoothing=eps, chosen_tokens=counts[:B], rejected_tokens=counts[B:], rpo_alpha=rpo)
    torch.testing.assert_close(losses.mean(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rc, beta * (sums[:B] - ref[:B]))


def test_conservative_dpo_is_the_label_smoothed_formula():
    c, r, rc, rr = torch.randn(4, B).unbind()
    beta, eps = 0.2, 0.15
    h = (c - rc) - (r - rr)
    want = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    torch.testing.assert_close(dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)[0], want)


def test_orpo_equals_trl():
    from trl.experimental.orpo import ORPOTrainer
    token, mask, _ = _sequences(1)
    sums, counts = token.sum(1), mask[:, 1:].sum(1).float()
    mean = sums / counts
    fake = _trainer(beta=0.25)
    trl_losses, trl_rc, _, _, _ = ORPOTrainer.odds_ratio_loss(fake, mean[:B], mean[B:])
    nll = -token[:B][mask[:B, 1:].bool()].mean()        # TRL: cross-entropy over the chosen tokens of the batch
    losses, rc, _ = orpo_loss(sums[:B], sums[B:], counts[:B], counts[B:], beta=0.25)
    torch.testing.assert_close(losses.mean(), nll - trl_losses.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rc, trl_rc)


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (2.5, 0.3)])
def test_simpo_equals_trl(beta, gamma):
    from trl.experimental.cpo import CPOTrainer
    token, mask, _ = _sequences(2)
    sums, counts = token.sum(1), mask[:, 1:].sum(1).float()
    mean = sums / counts
    fake = _trainer(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0)
    want, want_rc, _ = CPOTrainer.cpo_loss(fake, mean[:B], mean[B:])   # SimPO: CPO with cpo_alpha 0
    losses, rc, _ = simpo_loss(sums[:B], sums[B:], counts[:B], counts[B:], beta=beta, gamma=gamma)
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(rc, want_rc)


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (True, 0.01)])
def test_reward_loss_equals_trl(margin, center):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2 * B, 1, generator=g)
    inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
    m = torch.rand(B, generator=g)
    if margin:
        inputs["margin"] = m
    fake = _trainer(args=SimpleNamespace(center_rewards_coefficient=center))
    want = trl.RewardTrainer.compute_loss(fake, lambda **_: SimpleNamespace(logits=scores), inputs)
    got = reward_loss(scores[:B, 0], scores[B:, 0], m if margin else None, center).mean()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("beta, wd, wu", [(0.1, 1.0, 1.0), (0.5, 1.3, 0.7)])
def test_kto_equals_trl(beta, wd, wu):
    from tunesmith.train.objectives.kto import kto_loss
    token, mask, ref = _sequences(4)
    n = 2 * B
    g = torch.Generator().manual_seed(5)
    kl, ref_kl = -torch.rand(n, generator=g) * 5, -torch.rand(n, generator=g) * 5
    label = torch.tensor([True, False, True, True, False, False, True, False])
    out = SimpleNamespace(log_probs=token, entropy=torch.zeros_like(token), mean_logits=torch.zeros_like(token),
                          is_top1=torch.zeros_like(token, dtype=torch.bool))
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T),
              "completion_mask": mask, "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl}
    fake = _trainer(calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu,
                    _compute_kl_logps=lambda model, batch: kl)
    want = trl.KTOTrainer._compute_loss(fake, lambda **_: out, inputs, False)
    losses, _, _ = kto_loss(token.sum(1), ref, kl, ref_kl, label, beta=beta, desirable_weight=wd,
                            undesirable_weight=wu)
    torch.testing.assert_close(losses.mean(), want)
