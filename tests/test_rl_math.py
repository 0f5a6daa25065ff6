"""The PPO math with values computed by hand: masked statistics, whitening (local and global),
log-probs and entropy, KL estimators and controllers, KL-shaped rewards, GAE, the clipped losses."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.rl.advantages import gae, kl_shaped_rewards, last_token_index
from alignment.rl.distributions import entropy_from_logits, logprobs_from_logits
from alignment.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from alignment.rl.losses import clipped_policy_loss, clipped_value_loss
from alignment.rl.stats import RunningMoments, explained_variance, masked_mean, masked_moments, masked_whiten

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# --- masked statistics ----------------------------------------------------------------------


def test_masked_mean_and_moments_ignore_padding():
    x = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    assert close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    assert close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    mean, var, count = masked_moments(x, mask)
    assert close(mean, 7 / 3) and close(var, 14 / 9) and count == 3  # ((4/3)^2 + (1/3)^2 + (5/3)^2) / 3
    assert close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # nothing masked in: 0, not NaN


def test_masked_whiten():
    assert close(masked_whiten(T([0.0, 4.0]), T([1, 1])), [-1.0, 1.0])  # mean 2, std 2
    assert close(masked_whiten(T([0.0, 4.0]), T([1, 1]), shift_mean=False), [1.0, 3.0])  # rescaled, mean kept
    assert close(masked_whiten(T([[0.0, 4.0, 100.0]]), T([[1, 1, 0]])), [[-1.0, 1.0, 0.0]])  # padding ignored, stays 0


def test_whiten_with_a_cross_process_sum_equals_whitening_the_concatenation():
    """Two 'processes' hold [0, 4] and [8]; the reduce adds the other one's sums: the statistics are
    global (mean 4, var 32/3), exactly as whitening [0, 4, 8] at once."""
    a, b = T([0.0, 4.0]), T([8.0])
    other = T([8.0, 64.0, 1.0])  # process B's [sum, sum of squares, count]
    got = masked_whiten(a, torch.ones(2), reduce=lambda t: t + other)
    want = masked_whiten(torch.cat([a, b]), torch.ones(3))[:2]
    assert close(got, want) and close(got, [-4 / math.sqrt(32 / 3), 0.0])


def test_explained_variance():
    returns, mask = T([[1.0, 2.0, 3.0]]), T([[1, 1, 1]])
    assert close(explained_variance(returns, returns, mask), 1.0)
    assert close(explained_variance(torch.zeros(1, 3), returns, mask), 0.0)  # residual = returns
    assert close(explained_variance(T([[1.0, 2.0, 4.0]]), returns, mask), 2 / 3)  # var residual 2/9 over 2/3
    assert math.isnan(float(explained_variance(T([[1.0, 1.0]]), T([[2.0, 2.0]]), T([[1, 1]]))))


def test_running_moments_match_the_whole_stream():
    rm = RunningMoments()
    assert rm.update(T([1.0, 3.0])) == (2.0, 1.0)
    rm.update(T([5.0]))
    assert rm.mean == pytest.approx(3.0) and rm.var == pytest.approx(8 / 3) and rm.count == 3
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert other.state_dict() == rm.state_dict()


# --- distributions --------------------------------------------------------------------------


def test_logprobs_and_entropy_from_logits():
    logits = T([[[0.0, math.log(3.0)]]])  # softmax = [1/4, 3/4]
    assert close(logprobs_from_logits(logits, T([[1]])), [[math.log(0.75)]])
    assert close(logprobs_from_logits(logits, T([[0]])), [[math.log(0.25)]])
    assert close(entropy_from_logits(logits), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    uniform = torch.zeros(2, 3, 8)
    assert close(entropy_from_logits(uniform), torch.full((2, 3), math.log(8)))


# --- KL -------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref = T([[math.log(0.5)]]), T([[math.log(0.25)]])  # log r = log(0.25 / 0.5) = -ln 2
    ln2 = math.log(2)
    assert close(kl_penalty(logp, ref, "k1"), [[ln2]])
    assert close(kl_penalty(logp, ref, "k2"), [[0.5 * ln2 ** 2]])
    assert close(kl_penalty(logp, ref, "k3"), [[0.5 - 1 + ln2]])  # r - 1 - log r
    assert close(kl_penalty(ref, ref, "k3"), [[0.0]])
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_kl_log_ratio_is_clamped():
    logp, ref = T([[0.0]]), T([[-20.0]])  # log r = -20, clamped to -10
    assert close(kl_penalty(logp, ref, "k1", clamp=10.0), [[10.0]])
    assert close(kl_penalty(logp, ref, "k3", clamp=10.0), [[math.exp(-10) - 1 + 10]])
    assert close(kl_penalty(logp, ref, "k1", clamp=None), [[20.0]])


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.01)
    ctl.update(100.0, 512)
    assert ctl.value == 0.01


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)  # error clip(12/6 - 1) = +0.2 -> beta * (1 + 0.2 * 256 / 10000)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, 256)  # error +0.1
    assert ctl.value == pytest.approx(0.1 * 1.00256)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(0.0, 256)  # error clipped at -0.2
    assert ctl.value == pytest.approx(0.1 * 0.99488)
    restored = AdaptiveKLController(1.0, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# --- rewards and advantages -----------------------------------------------------------------


def test_last_token_index():
    assert last_token_index(T([[1, 1, 1], [1, 1, 0], [1, 0, 0]])).tolist() == [2, 1, 0]


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    scores = T([2.0, -1.0])
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 7.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    rewards = kl_shaped_rewards(scores, kl, mask, kl_coef=0.1)
    assert close(rewards, [[-0.01, -0.02, -0.03 + 2.0], [-0.05, -0.05 - 1.0, 0.0]])


def test_gae_by_hand():
    # gamma 1, lambda 0.5: deltas 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + 0.5 * 0.3, A0 = 0.1 + 0.5 * 0.25
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1, 1, 1]]), gamma=1.0, lam=0.5)
    assert close(adv, [[0.225, 0.25, 0.3]])
    assert close(ret, [[0.725, 0.85, 1.0]])


def test_gae_stops_at_the_end_of_each_response():
    # the last real token sees V = 0 after it; padding (reward 9, value 5) is ignored and stays 0
    adv, ret = gae(T([[0.0, 2.0, 9.0]]), T([[1.0, 1.0, 5.0]]), T([[1, 1, 0]]), gamma=0.9, lam=1.0)
    assert close(adv, [[0.8, 1.0, 0.0]])  # A1 = 2 - 1; A0 = (0 + 0.9 * 1 - 1) + 0.9 * 1
    assert close(ret, [[1.8, 2.0, 0.0]])


def test_gae_with_discount_and_lambda_both_below_one():
    # gamma 0.9, lambda 0.8, rewards (0, 0, 1), values (0.5, 0.4, 0.2):
    # delta2 = 1 - 0.2 = 0.8; delta1 = 0 + 0.9 * 0.2 - 0.4 = -0.22; delta0 = 0 + 0.9 * 0.4 - 0.5 = -0.14
    # A2 = 0.8; A1 = -0.22 + 0.72 * 0.8 = 0.356; A0 = -0.14 + 0.72 * 0.356 = 0.11632
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.4, 0.2]]), T([[1, 1, 1]]), gamma=0.9, lam=0.8)
    assert close(adv, [[0.11632, 0.356, 0.8]])
    assert close(ret, [[0.61632, 0.756, 1.0]])


def test_gae_with_lambda_one_is_monte_carlo():
    rewards, values, mask = T([[0.5, -1.0, 2.0]]), T([[0.3, 0.2, 0.1]]), T([[1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert close(ret, [[1.5, 1.0, 2.0]])  # returns = sums of future rewards
    assert close(adv, [[1.2, 0.8, 1.9]])


# --- losses ---------------------------------------------------------------------------------


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = T([[math.log(1.5), math.log(0.5), 5.0]])  # ratios 1.5, 0.5, and a padded token
    adv = T([[1.0, 1.0, 100.0]])
    mask = T([[1, 1, 0]])
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5 (unclipped)
    assert close(loss, (-1.2 - 0.5) / 2)
    assert close(stats["clipfrac"], 0.5)
    assert close(stats["approx_kl"], ((0.5 - math.log(1.5)) + (-0.5 + math.log(2))) / 2)
    assert close(stats["ratio"], 1.0)
    # a negative advantage with ratio 1.5: the pessimistic (unclipped) term 1.5 is kept
    loss, stats = clipped_policy_loss(T([[math.log(1.5)]]), T([[0.0]]), T([[-1.0]]), T([[1]]), clip=0.2)
    assert close(loss, 1.5) and close(stats["clipfrac"], 0.0)


def test_clipped_policy_loss_gradient_is_zero_outside_the_trust_region():
    logp = T([[math.log(1.5)]]).requires_grad_()
    loss, _ = clipped_policy_loss(logp, T([[0.0]]), T([[1.0]]), T([[1]]), clip=0.2)
    loss.backward()
    assert logp.grad.item() == 0.0  # the clipped branch is constant


def test_clipped_value_loss_by_hand():
    values, old, returns, mask = T([[1.5, 0.0, 9.0]]), T([[1.0, 0.0, 0.0]]), T([[2.0, 1.0, 0.0]]), T([[1, 1, 0]])
    loss, stats = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 1: max((1.5-2)^2, (1.2-2)^2) = 0.64 (clipped larger); token 2: max(1, 1) = 1
    assert close(loss, 0.5 * (0.64 + 1.0) / 2)
    assert close(stats["clipfrac"], 0.5)
    loss, _ = clipped_value_loss(values, old, returns, mask, clip=None)
    assert close(loss, 0.5 * (0.25 + 1.0) / 2)
