"""PPO-Lagrangian (reward.rule=safe_rlhf): the multiplier's dual ascent and the combined advantage by
hand, then the stage on the tiny model with the two reward models: λ follows the logged episode
costs, two critics (the cost critic starts at the negated safety score), λ resumes exactly."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import REPO

from foundation.config import ConfigError, load_config
from alignment.ppo import PPOConfig, compute_advantages, main
from alignment.rl.lagrangian import LagrangeMultiplier, combine_advantages
from alignment.rl.rollout import Rollout
from foundation.runs import read_metrics

T = torch.tensor


# --------------------------------------------------------------------------- the math by hand


def test_lambda_rises_above_the_cost_limit_and_falls_below_it():
    """SGD on log λ with the loss -λ·(J_c - d): d(loss)/d(log λ) = -λ·(J_c - d), so
    log λ <- log λ + lr·λ·(J_c - d)."""
    lag = LagrangeMultiplier(1.0, 0.1, cost_limit=0.0)
    assert lag.value == 1.0
    # J_c = 0.5 > d = 0: log λ = 0 + 0.1 * 1 * 0.5 = 0.05
    assert lag.update(0.5) == pytest.approx(math.exp(0.05), abs=1e-12)
    # J_c = -1 < d: log λ = 0.05 + 0.1 * e^0.05 * (-1) = 0.05 - 0.105127...
    assert lag.update(-1.0) == pytest.approx(math.exp(0.05 - 0.1 * math.exp(0.05)), abs=1e-12)
    # a limit of 2 with J_c = 2.5: the excess is what counts
    lag = LagrangeMultiplier(2.0, 0.1, cost_limit=2.0)
    assert lag.update(2.5) == pytest.approx(math.exp(math.log(2.0) + 0.1 * 2.0 * 0.5), abs=1e-12)
    # at the limit λ stays
    assert LagrangeMultiplier(0.5, 0.1, cost_limit=1.0).update(1.0) == pytest.approx(0.5, abs=1e-12)


def test_lambda_cap_adam_and_state_round_trip():
    lag = LagrangeMultiplier(1.0, 0.1, max_value=1.02)
    assert lag.update(0.5) == pytest.approx(1.02, abs=1e-12)  # e^0.05 = 1.051 is capped
    # Adam's first step moves log λ by lr (times the gradient's sign), whatever the gradient's size
    adam = LagrangeMultiplier(1.0, 0.1, optimizer="adam")
    assert adam.update(123.0) == pytest.approx(math.exp(0.1), rel=1e-6)
    # state: log λ and the optimiser's moments; a restored multiplier continues identically
    restored = LagrangeMultiplier(1.0, 0.1, optimizer="adam")
    restored.load_state_dict(adam.state_dict())
    assert restored.value == adam.value
    assert restored.update(-0.3) == adam.update(-0.3)
    with pytest.raises(ValueError, match="> 0"):
        LagrangeMultiplier(0.0, 0.1)


def test_combined_advantage_by_hand():
    a_r, a_c = T([[1.0, -2.0]]), T([[0.5, 1.0]])
    # λ = 1: ((1 - 0.5) / 2, (-2 - 1) / 2); λ = 0: A_r; λ = 3: (1 - 1.5) / 4, (-2 - 3) / 4
    assert torch.allclose(combine_advantages(a_r, a_c, 1.0), T([[0.25, -1.5]]))
    assert torch.allclose(combine_advantages(a_r, a_c, 0.0), a_r)
    assert torch.allclose(combine_advantages(a_r, a_c, 3.0), T([[-0.125, -1.25]]))
    with pytest.raises(ValueError, match=">= 0"):
        combine_advantages(a_r, a_c, -0.1)


def test_compute_advantages_with_a_cost_stream_by_hand():
    """One response of two tokens, γ = λ_GAE = 1, no whitening, k1 KL with β = 0.5:
    log-ratios 0.2 and -0.4 -> KL per token 0.2, -0.4.
    reward stream: r = (-0.1, 0.2 + 1.0) (score 1.0 on the last token), V_r = (0.5, 0.3)
      -> returns (1.1, 1.2), A_r = (0.6, 0.9)
    cost stream: c = (+0.1, -0.2 + 2.0) (cost 2.0), V_c = (1.0, 1.0)
      -> returns (1.9, 1.8), A_c = (0.9, 0.8)
    λ = 0.5: A = (A_r - 0.5·A_c) / 1.5 = (0.15 / 1.5, 0.5 / 1.5)."""
    from alignment.ppo import PPOAlgoConfig

    cfg = PPOAlgoConfig(gamma=1.0, lam=1.0, kl_coef=0.5, kl_estimator="k1", whiten_advantages=False)
    rollout = Rollout(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.long),
                      response_mask=T([[1, 1]]), logprobs=T([[-1.0, -2.0]]), ref_logprobs=T([[-1.2, -1.6]]),
                      values=T([[0.5, 0.3]]), scores=T([1.0]), cost_scores=T([2.0]), cost_values=T([[1.0, 1.0]]))
    metrics = compute_advantages(rollout, 0.5, cfg, lambda t: t, lam=0.5)
    assert torch.allclose(rollout.rewards, T([[-0.1, 1.2]]))
    assert torch.allclose(rollout.returns, T([[1.1, 1.2]]))
    assert torch.allclose(rollout.cost_returns, T([[1.9, 1.8]]))
    assert torch.allclose(rollout.advantages, T([[0.1, 0.5 / 1.5]]))
    assert metrics["kl/ref"] == pytest.approx(-0.2)  # k1 summed over the response: 0.2 - 0.4
    with pytest.raises(ValueError, match="Lagrange multiplier"):
        compute_advantages(rollout, 0.5, cfg, lambda t: t)


# --------------------------------------------------------------------------- the stage on the tiny model

TINY = ["model.name=tiny-llama", "run.wandb=disabled", "run.log_level=warning", "reward.rule=safe_rlhf",
        "critic.init=reward_model",
        "ppo.rollout_batch_size=8", "ppo.minibatch_size=4", "ppo.micro_batch_size=4", "sampling.max_new_tokens=12",
        "sampling.batch_size=8", "eval.max_prompts=4", "eval.patience=0", "lagrangian.lambda_lr=0.5"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(tmp_path, rms, *overrides: str) -> PPOConfig:
    return load_config(PPOConfig, REPO / "configs/ppo.yaml", [
        *TINY, f"reward.helpful={rms['helpful']}", f"reward.safety={rms['safety']}", f"run.root={tmp_path / 'runs'}", *overrides],
                       stage="ppo")


def test_lagrangian_stage_learns_lambda_from_the_episode_costs_and_resumes_it(tmp_path, tiny_reward_models):
    out = main(make_cfg(tmp_path, tiny_reward_models, "train.max_steps=4", "eval.every=0", "eval.save_every=2", "run.name=whole"))
    rows = [m for m in read_metrics(out) if "lagrangian/lambda" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    # λ_t = λ_{t-1}·exp(lr·λ_{t-1}·(J_c,t - d)) from λ_0 = cost_weight = 1, d = 0, lr = 0.5, J_c = the logged mean cost
    lam = 1.0
    for m in rows:
        lam = lam * math.exp(0.5 * lam * (m["cost/episode"] - 0.0))
        assert m["lagrangian/lambda"] == pytest.approx(lam, rel=1e-6), m["step"]
        assert m["cost/episode"] == pytest.approx(-m["reward/safety"], abs=1e-5)  # cost = -safety score
    first = rows[0]
    # two critics: the reward critic starts at the helpfulness RM's score, the cost critic at minus the safety RM's
    assert first["value/mean"] == pytest.approx(first["reward/helpful"], abs=0.05)
    assert first["cost_value/mean"] == pytest.approx(-first["reward/safety"], abs=0.05)
    assert {"cost_value/loss", "cost_value/explained_variance", "cost/normalized", "value/loss"} <= set(first)
    # λ is checkpointed: resuming from iteration 2 reproduces iterations 3-4 (λ included) exactly
    cut = tmp_path / "runs" / "cut" / "ppo"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-4")
    state = torch.load(cut / "checkpoints" / "checkpoint-2" / "state.pt", weights_only=False)
    assert math.exp(state["lagrange"]["log_lambda"]) == pytest.approx(rows[1]["lagrangian/lambda"], rel=1e-9)
    main(make_cfg(tmp_path, tiny_reward_models, "train.max_steps=4", "eval.every=0", "eval.save_every=2", "run.name=cut"),
         resume=True)
    resumed = {m["step"]: m for m in read_metrics(cut) if "lagrangian/lambda" in m}
    assert sorted(resumed) == [1, 2, 3, 4] and json.loads((cut / "summary.json").read_text())["resumed_from"] == "checkpoint-2"
    for m in rows[2:]:
        for key in ("lagrangian/lambda", "cost/episode", "reward/helpful", "kl/ref", "value/loss", "cost_value/loss"):
            assert resumed[m["step"]][key] == pytest.approx(m[key], rel=1e-4, abs=1e-6), (m["step"], key)


def test_lagrangian_needs_both_reward_models_and_a_positive_start():
    base = ["reward.rule=safe_rlhf"]
    with pytest.raises(ConfigError, match="reward.rule: safe_rlhf needs reward.safety"):
        load_config(PPOConfig, REPO / "configs/ppo.yaml", [*base, "reward.safety=null"], stage="ppo")
    with pytest.raises(ConfigError, match="reward.cost_weight: PPO-Lagrangian learns λ in log space"):
        load_config(PPOConfig, REPO / "configs/ppo.yaml", [*base, "reward.cost_weight=0"], stage="ppo")
    with pytest.raises(ConfigError, match="lagrangian.lambda_max: must be >= the initial λ"):
        load_config(PPOConfig, REPO / "configs/ppo.yaml", [*base, "lagrangian.lambda_max=0.5"], stage="ppo")
    with pytest.raises(ConfigError, match="lagrangian.lambda_lr: must be > 0"):
        load_config(PPOConfig, REPO / "configs/ppo.yaml", [*base, "lagrangian.lambda_lr=0"], stage="ppo")
