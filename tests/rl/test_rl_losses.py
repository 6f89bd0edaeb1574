"""The RL losses and advantages: each against its formula written out here, and GRPO's and RLOO's against
TRL 1.16's own code on the same inputs (TRL as a test-only oracle)."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunesmith.train.rl import losses

N, G, T = 8, 4, 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(N, T, generator=g) * 3).requires_grad_()
    old = (logp.detach() + 0.3 * torch.randn(N, T, generator=g))
    ref = logp.detach() + 0.2 * torch.randn(N, T, generator=g)
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rewards = torch.randint(0, 3, (N,), generator=g).float()
    return logp, old, ref, mask, rewards


def _written_out(logp, old, ref, mask, adv, loss_type, eps_low, eps_high, beta, max_tokens):
    """The GRPO family's loss, token by token."""
    total_tokens = int(mask.sum())
    seq_means = []
    total = 0.0
    for i in range(N):
        s, n_i = 0.0, int(mask[i].sum())
        for t in range(n_i):
            rho = torch.exp(logp[i, t] - old[i, t])
            clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
            l_t = -torch.min(rho * adv[i], clipped * adv[i])
            d = ref[i, t] - logp[i, t]
            l_t = l_t + beta * (torch.exp(d) - d - 1)
            s = s + l_t
        seq_means.append(s / n_i)
        total = total + s
    if loss_type == "grpo":
        return sum(seq_means) / N
    if loss_type == "dapo":
        return total / total_tokens
    return total / (N * max_tokens)


def test_group_advantages_are_the_rewards_normalised_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = losses.group_advantages(r, G)
    for p in range(2):
        grp = r[p * G:(p + 1) * G]
        mean = sum(grp) / G
        std = (sum((x - mean) ** 2 for x in grp) / (G - 1)) ** 0.5       # unbiased, as TRL's nanstd
        for j in range(G):
            assert adv[p * G + j] == pytest.approx(float((grp[j] - mean) / (std + 1e-4)), abs=1e-6)
    assert torch.equal(losses.group_advantages(r, G, "none"), r - r.view(2, G).mean(1).repeat_interleave(G))
    torch.testing.assert_close(losses.group_advantages(r, G, "batch"),
                               (r - r.view(2, G).mean(1).repeat_interleave(G)) / (r.std() + 1e-4))


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others():
    r = torch.tensor([1.0, 0.0, 3.0, 2.0])
    adv = losses.rloo_advantages(r, 4)
    for i in range(4):
        others = [float(x) for j, x in enumerate(r) if j != i]
        assert adv[i] == pytest.approx(float(r[i]) - sum(others) / 3)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_losses_equal_the_formula(loss_type):
    logp, old, ref, mask, rewards = _inputs()
    adv = losses.group_advantages(rewards, G)
    got = losses.grpo_loss(logp, old, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=0.28, beta=0.05,
                           ref_logp=ref, max_tokens=8)
    want = _written_out(logp, old, ref, mask, adv, loss_type, 0.2, 0.28, 0.05, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _trl_grpo(loss_type, beta, eps_low, eps_high, max_tokens):
    trl = pytest.importorskip("trl.trainer.grpo_trainer")
    t = trl.GRPOTrainer.__new__(trl.GRPOTrainer)
    acc = SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                          gather_for_metrics=lambda x: x, sync_gradients=True)
    args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    t.__dict__.update(beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
                      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
                      use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
                      _entropy_bonus_enabled=False, max_completion_length=max_tokens, args=args,
                      current_gradient_accumulation_steps=1, _metrics={"train": defaultdict(list)},
                      model=torch.nn.Linear(1, 1).train(), accelerator=acc)
    return t


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_losses_equal_trls(loss_type, beta):
    logp, old, ref, mask, rewards = _inputs(1)
    adv = losses.group_advantages(rewards, G)
    t = _trl_grpo(loss_type, beta, 0.2, 0.28, 8)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    want = t._compute_loss(None, inputs)
    got = losses.grpo_loss(logp, old, adv, mask, loss_type=loss_type, eps_low=0.2, eps_high=0.28, beta=beta,
                           ref_logp=ref, max_tokens=8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(got, logp)
    g2, = torch.autograd.grad(t._compute_loss(None, inputs), logp)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    _, region = losses.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert float((region.float() * mask).sum() / mask.sum()) == pytest.approx(
        t._metrics["train"]["clip_ratio/region_mean"][0], abs=1e-6)


def test_rloo_loss_equals_the_formula_and_trls():
    trl = pytest.importorskip("trl.trainer.rloo_trainer")
    logp, old, _, mask, rewards = _inputs(2)
    adv = losses.rloo_advantages(rewards, G)
    seq, old_seq = (logp * mask).sum(-1), (old * mask).sum(-1)
    got, _ = losses.rloo_loss_sum(seq, old_seq, adv, eps_low=0.2, eps_high=0.2)
    got = got / N
    want = sum(-torch.min(torch.exp(seq[i] - old_seq[i]) * adv[i],
                          torch.clamp(torch.exp(seq[i] - old_seq[i]), 0.8, 1.2) * adv[i]) for i in range(N)) / N
    torch.testing.assert_close(got, want)
    t = trl.RLOOTrainer.__new__(trl.RLOOTrainer)
    acc = SimpleNamespace(reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x)
    t.__dict__.update(epsilon_low=0.2, epsilon_high=0.2, aux_loss_enabled=False, accelerator=acc,
                      _metrics={"train": defaultdict(list)}, model=torch.nn.Linear(1, 1))
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_logps": old_seq}
    torch.testing.assert_close(got, t._compute_loss(None, inputs), rtol=1e-5, atol=1e-6)


def test_gae_equals_the_recursion_and_returns_are_advantages_plus_values():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).float()
    gamma, lam = 0.9, 0.8
    adv, ret = losses.gae(rewards, values, mask, gamma, lam)
    for i in range(2):
        n = int(mask[i].sum())
        v = [float(values[i, t]) for t in range(n)] + [0.0]
        for t in range(n):
            want = sum((gamma * lam) ** l * (float(rewards[i, t + l]) + gamma * v[t + l + 1] - v[t + l])
                       for l in range(n - t))
            assert float(adv[i, t]) == pytest.approx(want, abs=1e-5)
            assert float(ret[i, t]) == pytest.approx(want + v[t], abs=1e-5)
        assert torch.all(adv[i, n:] == 0)


def test_ppo_rewards_value_loss_whitening_and_the_adaptive_kl_controller():
    logp, old, ref, mask, _ = _inputs(4)
    score = torch.arange(N).float()
    logp = logp.detach()
    r, kl = losses.ppo_rewards(score, logp, ref, mask, kl_coef=0.1)
    for i in range(N):
        n = int(mask[i].sum())
        for t in range(n):
            want = -0.1 * float(logp[i, t] - ref[i, t]) + (float(score[i]) if t == n - 1 else 0.0)
            assert float(r[i, t]) == pytest.approx(want, abs=1e-5)
    values, old_v, returns = torch.randn(N, T), torch.randn(N, T), torch.randn(N, T)
    got, _ = losses.ppo_value_loss_sum(values, old_v, returns, mask, clip=0.2)
    want = sum(0.5 * max(float(values[i, t] - returns[i, t]) ** 2,
                         float(old_v[i, t] + torch.clamp(values[i, t] - old_v[i, t], -0.2, 0.2) - returns[i, t]) ** 2)
               for i in range(N) for t in range(int(mask[i].sum())))
    assert float(got) == pytest.approx(want, rel=1e-5)
    w = losses.whiten(values, mask)
    sel = w[mask.bool()]
    assert float(sel.mean()) == pytest.approx(0.0, abs=1e-5) and float(sel.pow(2).mean()) == pytest.approx(1.0, rel=1e-4)
    c = losses.KLController(0.2, target=6.0, horizon=100)
    c.update(12.0, 10)                       # error clipped to +0.2: β · (1 + 0.2 · 10 / 100)
    assert c.value == pytest.approx(0.2 * 1.02)
    c.update(3.0, 10)                        # error −0.5 clipped to −0.2
    assert c.value == pytest.approx(0.2 * 1.02 * 0.98)
    fixed = losses.KLController(0.2)
    fixed.update(100.0, 10)
    assert fixed.value == 0.2
