"""PPO's steps as units, values by hand: the forward passes' slicing against unpadded single-row
forwards, score normalisation, advantages end to end, and the device of every tensor that reaches a
cross-process reduction (NCCL reduces GPU tensors only: a CPU tensor there crashes a multi-GPU run)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import REPO

from foundation.config import load_config
from alignment.ppo import Context, PPOAlgoConfig, PPOConfig, PPORewardConfig, compute_advantages, normalize_scores, score_batch
from alignment.rl.rollout import Rollout, build_sequences
from alignment.rl.stats import RunningMoments

T = torch.tensor


# --------------------------------------------------------------------------- devices at the reductions


@dataclass
class Prompt:
    messages: list
    is_safety: bool = False
    category: str = "helpfulness"


class CPUScorer:
    """Like the real scorers (reward.combine.CombinedScorer): CPU tensors, whatever the device."""

    def score_detailed(self, prompts, responses, is_safety=None):
        helpful = T([float(len(r)) for r in responses])
        safety = T([1.0 - float(len(r)) / 4 for r in responses])
        return {"helpful": helpful, "safety": safety, "combined": helpful + safety}


class RecordingAccelerator:
    """An accelerator on another device than the scorers' (``meta``: shapes only), recording the
    device of every tensor handed to its reduction."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.seen: list[torch.device] = []

    def reduce(self, t, reduction="sum"):
        self.seen.append(t.device)
        return t


def context(overrides: list[str], device: str = "meta") -> Context:
    from alignment.rl.lagrangian import LagrangeMultiplier

    cfg = load_config(PPOConfig, REPO / "configs/ppo.yaml", overrides, stage="ppo")
    lagrange = LagrangeMultiplier(1.0, 0.1) if cfg.reward.rule == "safe_rlhf" else None
    return Context(cfg, RecordingAccelerator(device), None, None, CPUScorer(), None, None, RunningMoments(), {},
                   lagrange, RunningMoments())


@pytest.mark.parametrize("overrides", [[], ["reward.normalize=none"], ["reward.rule=safe_rlhf"]],
                         ids=["llama2", "none", "lagrangian"])
def test_every_tensor_reaching_a_reduction_is_on_the_accelerator_device(overrides):
    ctx = context(overrides)
    prompts = [Prompt([{"role": "user", "content": "q"}]), Prompt([{"role": "user", "content": "p"}], True, "safety")]
    raw, scores, cost_scores, metrics = score_batch(ctx, prompts, ["ab", "abcd"], T([True, False]))
    acc = ctx.accelerator
    assert len(acc.seen) >= 1 and set(acc.seen) == {torch.device("meta")}, acc.seen
    for t in [*raw.values(), scores, *metrics.values(), *([cost_scores] if cost_scores is not None else [])]:
        assert t.device == torch.device("meta")
    assert (cost_scores is not None) == ("reward.rule=safe_rlhf" in overrides)


def test_a_tensor_on_another_device_is_refused_before_the_collective():
    ctx = context([])
    with pytest.raises(RuntimeError, match="a tensor on cpu reached a cross-process reduction.*meta"):
        ctx.reduce(torch.zeros(3))
    assert ctx.accelerator.seen == []  # refused before the collective


def test_score_batch_values_by_hand_on_the_cpu():
    """Responses of 2 and 4 characters: helpful (2, 4), safety (0.5, 0), combined (2.5, 4).
    llama2 rule: combined whitened (-1, 1), the unfinished second loses 1: (-1, 0); logged std 0.75.
    PPO-Lagrangian: reward stream = helpful whitened (-1, 1) - (0, 1); cost = -safety = (-0.5, 0),
    whitened (-1, 1); the episode cost is the raw mean -0.25."""
    prompts = [Prompt([{"role": "user", "content": "q"}])] * 2
    _, scores, cost_scores, metrics = score_batch(context([], "cpu"), prompts, ["ab", "abcd"], T([True, False]))
    assert torch.allclose(scores, T([-1.0, 0.0]), atol=1e-6) and cost_scores is None
    assert metrics["reward/combined_std"].item() == pytest.approx(0.75)
    _, scores, cost_scores, metrics = score_batch(context(["reward.rule=safe_rlhf"], "cpu"), prompts,
                                                  ["ab", "abcd"], T([True, False]))
    assert torch.allclose(scores, T([-1.0, 0.0]), atol=1e-6)
    assert torch.allclose(cost_scores, T([-1.0, 1.0]), atol=1e-6)
    assert metrics["cost/episode"].item() == pytest.approx(-0.25)


# --------------------------------------------------------------------------- normalisation


def test_normalize_scores_by_hand():
    raw, finished = T([1.0, 3.0]), T([True, False])
    batch = PPORewardConfig(normalize="batch", clip=5.0, missing_eos_penalty=1.0)
    # mean 2, std 1: (-1, 1); the unfinished second loses 1
    assert torch.allclose(normalize_scores(raw, finished, batch, None, lambda t: t), T([-1.0, 0.0]), atol=1e-6)
    assert torch.allclose(normalize_scores(raw, None, batch, None, lambda t: t), T([-1.0, 1.0]), atol=1e-6)  # no EOS term
    clipped = PPORewardConfig(normalize="batch", clip=0.5, missing_eos_penalty=1.0)
    assert torch.allclose(normalize_scores(raw, finished, clipped, None, lambda t: t), T([-0.5, 0.0]), atol=1e-6)
    # global statistics: another process holds [5] (sums 5, 25, count 1): mean 3, var 8/3
    other = T([5.0, 25.0, 1.0])
    got = normalize_scores(raw, T([True, True]), batch, None, lambda t: t + other)
    assert torch.allclose(got, T([-2.0, 0.0]) / math.sqrt(8 / 3), atol=1e-5)
    # running statistics: after [1, 3] mean 2, var 1; after [5] mean 3, var 8/3 (the whole stream's)
    running = RunningMoments()
    cfg = PPORewardConfig(normalize="running", clip=0.0, missing_eos_penalty=0.5)
    assert torch.allclose(normalize_scores(raw, finished, cfg, running, lambda t: t), T([-1.0, 0.5]), atol=1e-6)
    assert (normalize_scores(T([5.0]), T([True]), cfg, running, lambda t: t).item()
            == pytest.approx(2 / math.sqrt(8 / 3), rel=1e-5))
    none = PPORewardConfig(normalize="none", clip=2.5, missing_eos_penalty=1.0)
    assert torch.allclose(normalize_scores(T([1.0, 3.0, -7.0]), T([True, True, False]), none, None, lambda t: t),
                          T([1.0, 2.5, -2.5]))


# --------------------------------------------------------------------------- advantages end to end


def test_compute_advantages_end_to_end_by_hand():
    """Two responses (2 tokens and 1), k1 KL, β = 0.1, γ = 0.9, λ = 0.5, advantages whitened.
    log r = ref - logp = (-0.5, 0 | 1.0): KL = (0.5, 0 | -1.0).
    rewards: row 0 = (-0.05, 0 + 1.0), row 1 = (0.1 - 1.0) = (-0.9).
    row 0: δ1 = 1.0 - 0.4 = 0.6, A1 = 0.6; δ0 = -0.05 + 0.9·0.4 - 0.2 = 0.11, A0 = 0.11 + 0.45·0.6 = 0.38.
    row 1: δ0 = -0.9 - 0.3 = -1.2 (the padded value 9 is ignored), A0 = -1.2.
    returns = A + V: (0.58, 1.0 | -0.9)."""
    ids, attn, resp = build_sequences([[5, 6], [7]], [[1, 2], [3]], pad_id=0)
    rollout = Rollout(ids, attn, resp, logprobs=T([[-1.0, -0.5], [-2.0, 0.0]]), ref_logprobs=T([[-1.5, -0.5], [-1.0, 0.0]]),
                      values=T([[0.2, 0.4], [0.3, 9.0]]), scores=T([1.0, -1.0]))
    cfg = PPOAlgoConfig(gamma=0.9, lam=0.5, kl_coef=0.1, kl_estimator="k1", whiten_advantages=True)
    metrics = compute_advantages(rollout, 0.1, cfg, lambda t: t)
    assert torch.allclose(rollout.rewards, T([[-0.05, 1.0], [-0.9, 0.0]]), atol=1e-6)
    assert torch.allclose(rollout.returns, T([[0.58, 1.0], [-0.9, 0.0]]), atol=1e-6)
    raw = [0.38, 0.6, -1.2]
    mean = sum(raw) / 3
    std = math.sqrt(sum(a * a for a in raw) / 3 - mean * mean)
    w = [(a - mean) / std for a in raw]
    assert torch.allclose(rollout.advantages, T([[w[0], w[1]], [w[2], 0.0]]), atol=1e-5)  # padding stays 0
    assert metrics["kl/ref"] == pytest.approx((0.5 - 1.0) / 2)  # per-sequence sums 0.5 and -1.0
    assert metrics["kl/penalty"] == pytest.approx(-0.25)  # k1: the same numbers
    assert metrics["reward/kl_shaped"] == pytest.approx((0.95 - 0.9) / 2)
    unwhitened = compute_advantages(rollout, 0.1, PPOAlgoConfig(gamma=0.9, lam=0.5, whiten_advantages=False), lambda t: t)
    assert unwhitened["kl/ref"] == metrics["kl/ref"]
    assert torch.allclose(rollout.advantages, T([[0.38, 0.6], [-1.2, 0.0]]), atol=1e-6)


# --------------------------------------------------------------------------- forward passes and their slicing


def test_policy_logprobs_and_critic_values_match_unpadded_single_row_forwards(tiny_model):
    """A left-padded batch (prompts of 3 and 1 tokens, responses of 2 and 4) gives, for each row,
    the log-probs and values that the same row gives alone without any padding."""
    from foundation.models import load_causal_lm
    from alignment.rl.actor_critic import critic_values, policy_logprobs
    from alignment.rl.critic import critic_from_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(tiny_model, device="cpu").eval()
    critic = critic_from_causal_lm(model, lora=None).eval()
    with torch.no_grad():
        critic.head.weight.normal_()  # a head that reads the hidden states (the built one starts at zero)
        critic.head.bias.fill_(0.3)
    prompts, responses = [[11, 12, 13], [14]], [[21, 22], [23, 24, 25, 26]]
    ids, attn, resp = build_sequences(prompts, responses, pad_id=0)
    R, temperature = resp.shape[1], 0.7
    with torch.no_grad():
        logprobs, entropy = policy_logprobs(model, ids, attn, R, temperature, with_entropy=True)
        values = critic_values(critic, ids, attn, R)
    assert logprobs.shape == values.shape == entropy.shape == (2, R)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        alone = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(alone).logits[0].float() / temperature  # position k predicts token k + 1
            v = critic(alone, torch.ones_like(alone))[0]
        for t, token in enumerate(r):
            pos = len(p) + t - 1  # the position that predicts response token t
            assert logprobs[i, t].item() == pytest.approx(torch.log_softmax(logits[pos], -1)[token].item(), abs=1e-4), (i, t)
            assert values[i, t].item() == pytest.approx(v[pos].item(), abs=1e-4), (i, t)  # V before token t
